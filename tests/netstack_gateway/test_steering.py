"""The steering NAT (netstack/csrc/steer.c) frame by frame, without root.

A ``Gateway`` on a stream uplink that maps the gateway address to the host (as passt
does) is driven with real frames over real socket pairs: this test plays both the VMM
and passt, so it sees exactly what the NAT writes (addresses, ports, checksums) and
what it hands the listeners. Guest frames are crafted hostile where it matters (stray
segments, straight to a pool port, a pool exhausted, QUIC)."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from netstack import NetworkPolicy, Rule, build_frame, parse_frame
from netstack.gateway import AddressPlan, Gateway
from netstack.gateway._steering import TLS_POOL, SteerClaim
from tests.netstack_gateway.test_gateway_loop import _sum, checksums_ok

pytestmark = pytest.mark.timeout(30)
PLAN = AddressPlan(3230)
GUEST, GW = str(PLAN.guest_ipv4), str(PLAN.gateway_ipv4)
REMOTE = "198.51.100.10"


class StreamPairUplink:
    """An uplink like passt's: u32-BE framed stream, gateway address -> host loopback."""

    stream_framing = True
    steer_to_host = True
    vnet_hdr = False
    ipv6_egress = False

    def __init__(self, plan: AddressPlan, host_loopback: bool = False,
                 kind: int = socket.SOCK_STREAM) -> None:
        self.plan, self.mtu, self.host_loopback = plan, 65520, host_loopback
        self.peer_uid: int | None = None
        self.outside, self._inside = socket.socketpair(socket.AF_UNIX, kind)
        self.tap_fd = self._inside.fileno()

    def set_mtu(self, mtu: int) -> None:
        self.mtu = mtu

    def close(self) -> None:
        self._inside.close()
        self.outside.close()


def fix_checksums(frame: bytes) -> bytes:
    """IPv4 + TCP/UDP checksums of a frame from build_frame (which leaves them zero)."""
    f = bytearray(frame)
    f[24:26] = struct.pack("!H", 0xFFFF - _sum(bytes(f[14:34])))
    proto, l4 = f[23], bytes(f[34:])
    off = 16 if proto == 6 else 6
    pseudo = bytes(f[26:34]) + struct.pack("!BBH", 0, proto, len(l4))
    f[34 + off:36 + off] = struct.pack("!H", 0xFFFF - _sum(pseudo + l4))
    return bytes(f)


def tcp(src: str, dst: str, sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
    return fix_checksums(build_frame(src, dst, "tcp", sport, dport, payload, flags=flags))


@contextmanager
def steered(policy: NetworkPolicy | None = None, *, host_loopback: bool = False
            ) -> Iterator[tuple[Gateway, StreamPairUplink, Any]]:
    up = StreamPairUplink(PLAN, host_loopback)
    vmm, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pol = policy or NetworkPolicy.custom(rules=[Rule.allow("198.51.100.0/24")])
    gw = Gateway(pol, uplink=up, guest_socket=mine, dns_upstreams=["192.0.2.53"],
                 own_uplink=True)
    ti = gw.tls_interception([443, 8443])
    try:
        yield gw, up, (vmm, ti)
    finally:
        ti.close()
        gw.close()
        vmm.close()


def send(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(struct.pack("!I", len(frame)) + frame)


def recv(sock: socket.socket, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    head = b""
    while len(head) < 4:
        head += sock.recv(4 - len(head))
    n = struct.unpack("!I", head)[0]
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return body


def nothing(sock: socket.socket, timeout: float = 0.3) -> bool:
    sock.settimeout(timeout)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    return False


def pool_ports(ti: Any) -> set[int]:
    return {int(s.getsockname()[1]) for s in ti.sockets}


def test_a_tls_flow_goes_to_a_pool_port_and_its_replies_come_back_as_the_origin() -> None:
    with steered() as (gw, up, (vmm, ti)):
        send(vmm, tcp(GUEST, REMOTE, 40000, 443, 0x02))
        out = recv(up.outside)
        info = parse_frame(out)
        assert str(info.dst) == GW and info.dport in pool_ports(ti), info
        assert info.sport == 40000 and checksums_ok(out)   # fixed incrementally
        port = info.dport
        # the listener on that port claims the original destination, once
        assert ti.lookup is not None
        assert ti.lookup(("127.0.0.1", 50000), ("127.0.0.1", port)) == (REMOTE, 443)
        assert ti.lookup(("127.0.0.1", 50001), ("127.0.0.1", port)) is None
        # the listener's SYN-ACK reaches the guest from the original destination
        send(up.outside, tcp(GW, GUEST, port, 40000, 0x12))
        back = recv(vmm)
        info = parse_frame(back)
        assert (str(info.src), info.sport, info.dport) == (REMOTE, 443, 40000)
        assert checksums_ok(back)
        # the flow's later segments keep their pool port
        send(vmm, tcp(GUEST, REMOTE, 40000, 443, 0x18, b"\x16\x03\x01hello"))
        again = parse_frame(recv(up.outside))
        assert (str(again.dst), again.dport) == (GW, port)
        st = gw.stats()["steering"]
        assert st["flows"] == 1 and st["claimed"] == 1 and st["live"] == 1, st


def test_unclaimed_flows_never_share_a_pool_port_and_a_full_pool_drops_syns() -> None:
    with steered() as (gw, up, (vmm, ti)):
        ports = []
        for i in range(TLS_POOL):
            send(vmm, tcp(GUEST, REMOTE, 41000 + i, 8443, 0x02))
            ports.append(parse_frame(recv(up.outside)).dport)
        assert sorted(ports) == sorted(pool_ports(ti))
        send(vmm, tcp(GUEST, REMOTE, 42000, 8443, 0x02))     # every port has a flow waiting
        assert nothing(up.outside)
        assert gw.stats()["steering"]["pool_busy"] == 1
        assert ti.lookup is not None
        assert ti.lookup(("127.0.0.1", 1), ("127.0.0.1", ports[3])) == (REMOTE, 8443)
        send(vmm, tcp(GUEST, REMOTE, 42000, 8443, 0x02))     # the guest retries: that port
        assert parse_frame(recv(up.outside)).dport == ports[3]


def test_hostile_guest_frames_are_dropped() -> None:
    # the policy admits the host group: what stops these is the NAT, not the classifier
    policy = NetworkPolicy.custom(rules=[Rule.allow("198.51.100.0/24"),
                                         Rule.allow(destination="host")])
    with steered(policy) as (gw, up, (vmm, ti)):
        port = min(pool_ports(ti))
        for frame in (
            tcp(GUEST, REMOTE, 43000, 443, 0x10),            # no SYN, no flow: stray
            tcp(GUEST, GW, 43001, port, 0x02),               # straight to a listener
            tcp(GUEST, GW, 43002, 8080, 0x02),               # the host, not allowed here
            fix_checksums(build_frame(GUEST, REMOTE, "udp", 5000, 443, b"quic")),
        ):
            send(vmm, frame)
        assert nothing(up.outside)
        st = gw.stats()["steering"]
        assert st["stray"] == 1 and st["gateway_dropped"] == 2 and st["udp_dropped"] == 1, st
        # a reply from a listener port for no flow never reaches the guest
        send(up.outside, tcp(GW, GUEST, port, 43000, 0x12))
        assert nothing(vmm)
        # flows elsewhere are untouched
        send(vmm, tcp(GUEST, REMOTE, 43003, 80, 0x02))
        info = parse_frame(recv(up.outside))
        assert (str(info.dst), info.dport) == (REMOTE, 80)


def test_dns_over_tcp_to_any_address_reaches_the_forwarder_pool() -> None:
    with steered(NetworkPolicy.public_only()) as (_, up, (vmm, ti)):
        send(vmm, tcp(GUEST, "203.0.113.53", 44000, 53, 0x02))
        out = recv(up.outside)
        info = parse_frame(out)
        assert str(info.dst) == GW and info.dport not in pool_ports(ti) and checksums_ok(out)
        # the forwarder's own listener claimed nothing yet; its answer comes back from
        # the address the guest asked
        send(up.outside, tcp(GW, GUEST, info.dport, 44000, 0x12))
        back = parse_frame(recv(vmm))
        assert (str(back.src), back.sport) == ("203.0.113.53", 53)


def test_the_host_is_reachable_at_the_gateway_only_with_host_loopback() -> None:
    policy = NetworkPolicy.custom(rules=[Rule.allow(destination="host")])
    for allowed in (False, True):
        with steered(policy, host_loopback=allowed) as (gw, up, (vmm, _)):
            send(vmm, tcp(GUEST, GW, 45000, 8080, 0x02))
            if allowed:
                info = parse_frame(recv(up.outside))
                assert (str(info.dst), info.dport) == (GW, 8080)
            else:
                assert nothing(up.outside)
                assert gw.stats()["steering"]["gateway_dropped"] == 1


def test_a_claim_is_honoured_only_for_the_uplinks_uid(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    """A process of another user connecting to a listener port gets nothing, so it can
    never take over a guest's flow (and the secrets the proxy would add to it)."""
    srv = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(srv.getsockname())
    conn, peer = srv.accept()
    try:
        local = conn.getsockname()
        mine = SteerClaim(lambda port: (REMOTE, 443), os.geteuid())
        assert mine(peer, local) == (REMOTE, 443)
        other = SteerClaim(lambda port: (REMOTE, 443), os.geteuid() + 1)
        with caplog.at_level("WARNING", logger="netstack.gateway"):
            assert other(peer, local) is None
        refusals = [r for r in caplog.records if "was refused" in r.getMessage()]
        assert len(refusals) == 1
    finally:
        for s in (conn, client, srv):
            s.close()


def test_every_send_to_a_stream_uplink_starts_at_a_frame() -> None:
    """passt loses the framing when one of its reads ends inside a length prefix, and a
    reader may stop after any send(): the loop sends one frame, or a small run of whole
    frames, per call (a SOCK_SEQPACKET pair shows each send as one record)."""
    up = StreamPairUplink(PLAN, kind=socket.SOCK_SEQPACKET)
    vmm, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    policy = NetworkPolicy.custom(rules=[Rule.allow("198.51.100.0/24")])
    frames = [tcp(GUEST, REMOTE, 46000 + i % 7, 80, 0x02 if i < 7 else 0x10,
                  bytes(i * 997 % 30000 if i % 5 == 0 else 0)) for i in range(120)]
    with Gateway(policy, uplink=up, guest_socket=mine, dns_upstreams=["192.0.2.53"],
                 own_uplink=True):
        vmm.sendall(b"".join(struct.pack("!I", len(f)) + f for f in frames))
        got: list[bytes] = []
        up.outside.settimeout(2)
        while len(got) < len(frames):
            record = up.outside.recv(1 << 20)
            off, whole = 0, []
            while off < len(record):          # whole framed frames, nothing cut
                n = struct.unpack("!I", record[off:off + 4])[0]
                assert off + 4 + n <= len(record), (off, n, len(record))
                whole.append(record[off + 4:off + 4 + n])
                off += 4 + n
            assert len(whole) == 1 or len(record) <= 2048, [len(w) for w in whole]
            got.extend(whole)
        assert got == frames
    vmm.close()


def _tcp6(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    f = bytearray(build_frame(src, dst, "tcp", sport, dport, flags=flags))
    l4 = bytes(f[54:])
    pseudo = bytes(f[22:54]) + struct.pack("!IxxxB", len(l4), 6)
    f[70:72] = struct.pack("!H", 0xFFFF - _sum(pseudo + l4))
    return bytes(f)


def _tcp6_ok(frame: bytes) -> bool:
    l4 = frame[54:]
    return _sum(frame[22:54] + struct.pack("!IxxxB", len(l4), 6) + l4) == 0xFFFF


def test_ipv6_flows_are_steered_to_the_gateways_ipv6_address() -> None:
    """With IPv6 egress the pools listen on ::1 too (passt maps the gateway's IPv6
    address there) and guest IPv6 TLS flows are steered like IPv4 ones."""
    plan = AddressPlan(3231, ipv6=True)
    up = StreamPairUplink(plan)
    up.ipv6_egress = True
    vmm, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guest6, gw6, remote6 = str(plan.guest_ipv6), str(plan.gateway_ipv6), "2001:db8:100::10"
    with Gateway(NetworkPolicy.custom(rules=[Rule.allow("2001:db8:100::/64")]), uplink=up,
                 guest_socket=mine, dns_upstreams=["192.0.2.53"], own_uplink=True) as gw:
        ti = gw.tls_interception([443])
        try:
            families = {s.family for s in ti.sockets}
            assert families == {socket.AF_INET, socket.AF_INET6}
            send(vmm, _tcp6(guest6, remote6, 47000, 443, 0x02))
            out = recv(up.outside)
            info = parse_frame(out)
            assert str(info.dst) == gw6 and info.dport in pool_ports(ti) and _tcp6_ok(out)
            assert ti.lookup is not None
            assert ti.lookup(("::1", 1), ("::1", info.dport)) == (remote6, 443)
            send(up.outside, _tcp6(gw6, guest6, info.dport, 47000, 0x12))
            back = recv(vmm)
            got = parse_frame(back)
            assert (str(got.src), got.sport) == (remote6, 443) and _tcp6_ok(back)
        finally:
            ti.close()
    vmm.close()
