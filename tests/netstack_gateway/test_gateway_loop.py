"""The C gateway loop (netstack/csrc/gateway.c) on its own, without root.

The uplink TAP is stood in for by a SOCK_DGRAM socketpair (one datagram = one frame,
exactly a TAP's read/write semantics); the guest side is a real stream or datagram
socketpair, or another datagram pair in "tap" mode. Frames crafted by the loop (RST,
ICMP unreachable, injected UDP) are checked with independent checksum code.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from netstack import Classifier, NetworkPolicy, PinCache, Rule, build_frame
from netstack._fastpath import ffi, lib
from tests.netstack_fastpath._tls import python_hello

GUEST, REMOTE, GW = "172.16.0.2", "198.51.100.10", "172.16.0.1"
GUEST_MAC, GW_MAC = b"\x02\x00\x00\x00\x00\x02", b"\x02\x00\x00\x00\x00\x01"
pytestmark = pytest.mark.timeout(30)


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def checksums_ok(frame: bytes) -> bool:
    """Verify the IPv4 header checksum and the TCP/UDP/ICMP checksum of ``frame``."""
    assert frame[12:14] == b"\x08\x00"
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    if _sum(ip[:ihl]) != 0xFFFF:
        return False
    l4 = ip[ihl:total]
    proto = ip[9]
    if proto == 1:
        return _sum(l4) == 0xFFFF
    pseudo = ip[12:20] + struct.pack("!BBH", 0, proto, len(l4))
    return _sum(pseudo + l4) == 0xFFFF


@dataclass
class Loop:
    gw: Any
    guest: socket.socket      # the VMM's end
    uplink: socket.socket     # the namespace's end of the "TAP"
    classifier: Classifier
    mode: str

    def send(self, frame: bytes) -> None:
        if self.mode == "stream":
            self.guest.sendall(struct.pack("!I", len(frame)) + frame)
        else:
            self.guest.send(frame)

    def recv_guest(self, timeout: float = 2.0) -> bytes:
        self.guest.settimeout(timeout)
        if self.mode != "stream":
            return self.guest.recv(70000)
        head = self._exact(4)
        return self._exact(struct.unpack("!I", head)[0])

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.guest.recv(n - len(buf))
            assert chunk, "guest side closed"
            buf += chunk
        return buf

    def recv_uplink(self, timeout: float = 2.0) -> bytes:
        self.uplink.settimeout(timeout)
        return self.uplink.recv(70000)

    def no_uplink(self, wait: float = 0.3) -> bool:
        self.uplink.settimeout(wait)
        try:
            self.uplink.recv(70000)
        except TimeoutError:
            return True
        return False

    def events(self, want: int = 1, timeout: float = 2.0) -> list[tuple[int, int, bytes]]:
        ev = ffi.new("ns_gw_event *")
        data = ffi.new("uint8_t[]", 2048)
        out: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            while lib.ns_gw_next_event(self.gw, ev, data, 2048):
                out.append((int(ev.kind), int(ev.verdict), bytes(ffi.buffer(data, ev.len))))
            time.sleep(0.01)
        return out

    def stats(self) -> Any:
        st = ffi.new("ns_gw_stats *")
        lib.ns_gw_stats_get(self.gw, st)
        return st

    def counter(self, name: str, want: int, timeout: float = 2.0) -> int:
        """Counter ``name`` once it reaches ``want`` (or after ``timeout``): the loop
        counts a frame after writing it, so a test that already saw the frame may read
        the counter a moment too early."""
        deadline = time.monotonic() + timeout
        while (value := int(getattr(self.stats(), name))) < want \
                and time.monotonic() < deadline:
            time.sleep(0.005)
        return value


@contextmanager
def loop(policy: NetworkPolicy, mode: str = "stream", pins: PinCache | None = None,
         hello_timeout: float = 5.0, capture: bool = False, vnet: bool = False,
         guest_mtu: int = 0, uplink_mtu: int = 0, udp_published: tuple[int, ...] = (),
         gateway_ip: str | None = None, gateway_ip6: str | None = None,
         dns_tcp_reset: bool = False) -> Iterator[Loop]:
    kind = socket.SOCK_STREAM if mode == "stream" else socket.SOCK_DGRAM
    vmm, mine = socket.socketpair(socket.AF_UNIX, kind)
    ns_end, tap_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    classifier = Classifier(policy, gateway=[GW], pins=pins, intercept_ports=(),
                            hello_timeout=hello_timeout)
    cfg = ffi.new("ns_gw_config *")
    cfg.guest_fd = mine.fileno()
    cfg.guest_mode = {"stream": 0, "dgram": 1, "tap": 2}[mode]
    cfg.uplink_fd = tap_end.fileno()
    ffi.memmove(cfg.guest_mac, GUEST_MAC, 6)
    ffi.memmove(cfg.gateway_mac, GW_MAC, 6)
    cfg.event_slots = 64
    cfg.hello_timeout = hello_timeout
    cfg.log_denied = 1
    cfg.capture = 1 if capture else 0
    cfg.uplink_vnet = 1 if vnet else 0
    cfg.guest_mtu = guest_mtu
    cfg.uplink_mtu = uplink_mtu
    for i, port in enumerate(udp_published):
        cfg.published_udp[i] = port
    cfg.npublished_udp = len(udp_published)
    if gateway_ip is not None:
        ffi.memmove(cfg.gateway_ip, socket.inet_pton(socket.AF_INET6, "::ffff:" + gateway_ip), 16)
    if gateway_ip6 is not None:
        ffi.memmove(cfg.gateway_ip6, socket.inet_pton(socket.AF_INET6, gateway_ip6), 16)
    cfg.dns_tcp_reset = 1 if dns_tcp_reset else 0
    gw = lib.ns_gw_new(classifier.handle, cfg)
    assert gw != ffi.NULL
    assert lib.ns_gw_start(gw) == 0
    try:
        yield Loop(gw, vmm, ns_end, classifier, mode)
    finally:
        lib.ns_gw_stop(gw)
        lib.ns_gw_stop(gw)  # idempotent
        lib.ns_gw_free(gw)
        classifier.close()
        for s in (vmm, mine, ns_end, tap_end):
            s.close()


def syn(dst: str = REMOTE, dport: int = 80, sport: int = 40000) -> bytes:
    return build_frame(GUEST, dst, "tcp", sport, dport, flags=0x02, seq=1000)


def test_stream_frames_split_and_batched_reach_the_uplink() -> None:
    with loop(NetworkPolicy.allow_all()) as lp:
        a, b = syn(sport=1), syn(sport=2)
        wire = struct.pack("!I", len(a)) + a + struct.pack("!I", len(b)) + b
        # partial reads: the prefix and the frames arrive in pieces
        for piece in (wire[:2], wire[2:9], wire[9:len(a) + 6], wire[len(a) + 6:]):
            lp.guest.sendall(piece)
            time.sleep(0.02)
        assert lp.recv_uplink() == a
        assert lp.recv_uplink() == b
        # several frames in one read (a unix datagram pair queues only ~10: stay below)
        many = [syn(sport=100 + i) for i in range(8)]
        lp.guest.sendall(b"".join(struct.pack("!I", len(f)) + f for f in many))
        got = [lp.recv_uplink() for _ in many]
        assert got == many
        assert lp.counter("to_uplink", 10) == 10


def test_denied_tcp_gets_a_valid_rst() -> None:
    with loop(NetworkPolicy.public_only()) as lp:
        lp.send(syn(dst="10.1.2.3"))
        rst = lp.recv_guest()
        assert rst[:6] == b"\x02\x00\x00\x00\x00\x02" and checksums_ok(rst)
        ip = rst[14:34]
        assert socket.inet_ntoa(ip[12:16]) == "10.1.2.3" and socket.inet_ntoa(ip[16:20]) == GUEST
        sport, dport, _seq, ack, _off, flags = struct.unpack("!HHIIBB", rst[34:48])
        assert (sport, dport, ack, flags) == (80, 40000, 1001, 0x14)  # RST|ACK for the SYN
        assert lp.no_uplink()
        kinds = [k for k, _, _ in lp.events()]
        assert kinds == [2]  # a "denied" record


def test_denied_udp_gets_icmp_port_unreachable_quoting_it() -> None:
    with loop(NetworkPolicy.public_only()) as lp:
        probe = build_frame(GUEST, "10.9.9.9", "udp", 5555, 7777, b"data")
        lp.send(probe)
        icmp = lp.recv_guest()
        assert checksums_ok(icmp)
        assert icmp[23] == 1 and icmp[34:36] == b"\x03\x03"  # ICMP, type 3 code 3
        assert icmp[42:] == probe[14:]                        # the quoted datagram


def test_dns_query_goes_to_the_owner_and_injected_answer_is_valid() -> None:
    with loop(NetworkPolicy.none()) as lp:
        q = build_frame(GUEST, GW, "udp", 33333, 53, b"\x12\x34query")
        lp.send(q)
        events = lp.events()
        assert events and events[0][0] == 1 and events[0][2] == q
        assert lp.no_uplink(0.1)
        src = socket.inet_pton(socket.AF_INET6, "::ffff:" + GW)
        dst = socket.inet_pton(socket.AF_INET6, "::ffff:" + GUEST)
        payload = b"\x12\x34answer"
        assert lib.ns_gw_inject_udp(lp.gw, src, 53, dst, 33333, payload, len(payload)) == 0
        frame = lp.recv_guest()
        assert frame[:6] == GUEST_MAC and frame[6:12] == GW_MAC and checksums_ok(frame)
        assert struct.unpack("!HH", frame[34:38]) == (53, 33333) and frame[42:] == payload
        assert lib.ns_gw_inject(lp.gw, b"short", 5) == -1


def test_only_replies_come_back_from_the_uplink() -> None:
    with loop(NetworkPolicy.public_only()) as lp:
        lp.send(syn())
        assert lp.recv_uplink() == syn()
        reply = build_frame(REMOTE, GUEST, "tcp", 80, 40000, flags=0x12)
        stranger = build_frame(REMOTE, GUEST, "tcp", 80, 40001, flags=0x02)
        lp.uplink.send(stranger)
        lp.uplink.send(reply)
        assert lp.recv_guest() == reply
        time.sleep(0.1)
        assert lp.counter("not_reply", 1) == 1


@pytest.mark.parametrize("vfkt", [False, True])
def test_datagram_guest_with_optional_vfkt_handshake(vfkt: bool) -> None:
    with loop(NetworkPolicy.allow_all(), mode="dgram") as lp:
        if vfkt:
            lp.guest.send(b"VFKT")
        lp.send(syn())
        assert lp.recv_uplink() == syn()
        reply = build_frame(REMOTE, GUEST, "tcp", 80, 40000, flags=0x12)
        lp.uplink.send(reply)
        assert lp.recv_guest() == reply


def test_tap_guest_side() -> None:
    with loop(NetworkPolicy.public_only(), mode="tap") as lp:
        lp.send(syn())
        assert lp.recv_uplink() == syn()
        lp.send(syn(dst="169.254.169.254"))
        assert checksums_ok(lp.recv_guest())


def _pinned(name: str) -> tuple[NetworkPolicy, PinCache]:
    pins = PinCache()
    pins.pin(name, [REMOTE], ttl=600)
    return NetworkPolicy.custom(rules=[Rule.allow(name, protocol="tcp")]), pins


def data(seq: int, payload: bytes, flags: int = 0x18) -> bytes:
    return build_frame(GUEST, REMOTE, "tcp", 40000, 443, payload, flags=flags, seq=seq)


def test_split_client_hello_is_held_then_released_in_order() -> None:
    policy, pins = _pinned("api.example.com")
    with loop(policy, pins=pins) as lp:
        lp.send(syn(dport=443))
        assert lp.recv_uplink() == syn(dport=443)  # handshake passes while pending
        ch = python_hello("api.example.com")
        first, second = data(1001, ch[:100]), data(1001 + 100, ch[100:])
        lp.send(first)
        assert lp.no_uplink()                      # held: the SNI is not complete yet
        assert lib.ns_gw_pending(lp.gw) == 1
        lp.send(second)
        assert lp.recv_uplink() == first           # released in order
        assert lp.recv_uplink() == second
        time.sleep(0.05)
        assert lib.ns_gw_pending(lp.gw) == 0 and lp.counter("released", 1) == 1


def test_denied_sni_resets_both_sides() -> None:
    policy, pins = _pinned("api.example.com")
    with loop(policy, pins=pins) as lp:
        lp.send(syn(dport=443))
        lp.recv_uplink()
        ch = python_hello("evil.example.net")
        lp.send(data(1001, ch, flags=0x18))
        up = lp.recv_uplink()                      # RST to the server at the hello's seq
        assert checksums_ok(up) and up[47] == 0x04
        assert struct.unpack("!I", up[38:42])[0] == 1001
        rst = lp.recv_guest()                      # and one to the guest
        assert checksums_ok(rst) and rst[47] & 0x04


def test_undecided_flow_is_decided_by_the_timer() -> None:
    policy, pins = _pinned("api.example.com")
    with loop(policy, pins=pins, hello_timeout=0.2) as lp:
        lp.send(syn(dport=443))
        lp.recv_uplink()
        partial = data(1001, python_hello("api.example.com")[:50])
        lp.send(partial)
        # no SNI within the timeout: decided by the pinned name (allowed) and released
        assert lp.recv_uplink(3.0) == partial
        deadline = time.monotonic() + 2
        while lib.ns_gw_pending(lp.gw) and time.monotonic() < deadline:
            time.sleep(0.01)  # the loop frees the entry right after the release
        assert lib.ns_gw_pending(lp.gw) == 0


def test_broken_stream_is_reported() -> None:
    with loop(NetworkPolicy.allow_all()) as lp:
        lp.guest.sendall(b"\0\0\0\0junk")
        events = lp.events()
        assert events and events[0][:2] == (4, 7)


def test_capture_records_carry_verdicts() -> None:
    with loop(NetworkPolicy.public_only(), capture=True) as lp:
        lp.send(syn())
        lp.send(syn(dst="10.0.0.1"))
        lp.recv_uplink()
        kinds = [(k, v) for k, v, _ in lp.events(want=3)]
        assert (3, 0) in kinds and (3, 2) in kinds


def test_build_reject_ignores_what_deserves_no_answer() -> None:
    out = ffi.new("uint8_t[]", 1500)
    rst = build_frame(GUEST, REMOTE, "tcp", 1, 2, flags=0x04)
    ping = build_frame(GUEST, REMOTE, "icmpv4", icmp_type=8)
    for frame in (rst, ping, b"junk"):
        assert lib.ns_gw_build_reject(frame, len(frame), out, 1500) == 0
    v6 = build_frame("fd00::2", "fd00::9", "udp", 1, 2, b"x")
    n = lib.ns_gw_build_reject(v6, len(v6), out, 1500)
    icmp6 = bytes(out[0:n])
    assert icmp6[20] == 58 and icmp6[54:56] == b"\x01\x04"  # ICMPv6 port unreachable
    pseudo = icmp6[22:54] + struct.pack("!IxxxB", n - 54, 58)
    assert _sum(pseudo + icmp6[54:]) == 0xFFFF


def test_vnet_uplink_coalesces_a_tcp_run_into_one_gso_packet() -> None:
    with loop(NetworkPolicy.allow_all(), vnet=True) as lp:
        segs = [build_frame(GUEST, REMOTE, "tcp", 40000, 80, bytes([65 + i]) * 1000,
                            flags=0x10, seq=5000 + 1000 * i) for i in range(3)]
        last = build_frame(GUEST, REMOTE, "tcp", 40000, 80, b"Z" * 10, flags=0x18, seq=8000)
        lp.guest.sendall(b"".join(struct.pack("!I", len(f)) + f for f in [*segs, last]))
        pkt = lp.recv_uplink()
        hdr, frame = pkt[:10], pkt[10:]
        flags, gso_type, hdr_len, gso_size, csum_start, csum_off = struct.unpack("<BBHHHH", hdr)
        assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_off) == (1, 1, 54, 1000, 34,
                                                                              16)
        assert frame[54:] == b"A" * 1000 + b"B" * 1000 + b"C" * 1000 + b"Z" * 10
        assert struct.unpack("!H", frame[16:18])[0] == 20 + 20 + 3010   # IP total length
        assert _sum(frame[14:34]) == 0xFFFF                             # IP header checksum
        assert frame[47] == 0x18                                        # PSH carried over
        # the checksum field holds the pseudo-header sum (the kernel completes it per segment)
        pseudo = frame[26:34] + struct.pack("!BBH", 0, 6, 20 + 3010)
        assert struct.unpack("!H", frame[50:52])[0] == _sum(pseudo)
        # a lone frame goes out unchanged behind an all-zero header
        other = syn(dport=22)
        lp.send(other)
        assert lp.recv_uplink() == bytes(10) + other
        assert lp.counter("to_uplink", 5) == 5


# -- large guest link MTU -------------------------------------------------------------------
def _tcp_with_mss(src: str, dst: str, sport: int, dport: int, mss: int, flags: int) -> bytes:
    """A SYN / SYN-ACK with options NOP, NOP, MSS (odd-aligned on purpose: the value
    straddles 16-bit checksum words), timestamps; checksums computed."""
    opts = b"\x01\x02\x04" + struct.pack("!H", mss) + b"\x01\x01\x01\x08\x0a" + bytes(10)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 7000, 1001, (5 + len(opts) // 4) << 4, flags,
                      65535, 0, 0) + opts
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0) + \
        socket.inet_aton(src) + socket.inet_aton(dst)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _sum(ip)) + ip[12:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", 0xFFFF - _sum(pseudo + tcp)) + tcp[18:]
    return GUEST_MAC + GW_MAC + b"\x08\x00" + ip + tcp


def _mss_of(frame: bytes) -> int:
    opts = frame[54:14 + 20 + (frame[46] >> 4) * 4]
    i = opts.index(b"\x02\x04")
    return int(struct.unpack("!H", opts[i + 2:i + 4])[0])


@pytest.mark.parametrize("mode", ["stream", "dgram"])
def test_large_guest_frame_leaves_as_gso_cut_to_the_uplink_mss(mode: str) -> None:
    """A 65,534-byte guest TCP frame (MTU 65520) crosses both transports whole and is
    written to the vnet uplink with gso_size = the uplink's MSS (1500 - 52 here)."""
    with loop(NetworkPolicy.allow_all(), mode=mode, vnet=True, guest_mtu=65520,
              uplink_mtu=1500) as lp:
        payload = bytes(range(256)) * 255 + b"0123456789" * 1  # 65,290 bytes
        opts = b"\x01\x01\x08\x0a" + bytes(8)                 # timestamps: 32-byte TCP header
        tcp = struct.pack("!HHIIBBHHH", 40000, 80, 9000, 1, 8 << 4, 0x10, 65535, 0, 0) + opts
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0x4000, 64, 6,
                         0) + socket.inet_aton(GUEST) + socket.inet_aton(REMOTE)
        frame = GW_MAC + GUEST_MAC + b"\x08\x00" + ip + tcp + payload
        assert len(frame) == 65_356
        lp.send(frame)
        pkt = lp.recv_uplink()
        hdr, out = pkt[:10], pkt[10:]
        flags, gso_type, hdr_len, gso_size, csum_start, csum_off = struct.unpack("<BBHHHH", hdr)
        assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_off) == (1, 1, 66, 1448,
                                                                              34, 16)
        assert len(out) == len(frame) and out[66:] == payload and out[:50] == frame[:50]
        pseudo = out[26:34] + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
        assert struct.unpack("!H", out[50:52])[0] == _sum(pseudo)
        # the largest frame the link can carry (65,549 bytes) passes the stream framing
        # too; UDP with DF that large cannot leave: ICMP "fragmentation needed" comes back
        big = _df(build_frame(GUEST, REMOTE, "udp", 5000, 6000, bytes(65549 - 42)))
        lp.send(big)
        icmp = lp.recv_guest()
        assert icmp[34:36] == b"\x03\x04" and icmp[42:] == big[14:14 + 548]
        assert lp.counter("frag_needed", 1) == 1
        assert lp.counter("to_uplink", 1) == 1 and lp.no_uplink(0.1)


def test_syn_towards_a_large_mtu_guest_gets_its_mss_raised() -> None:
    with loop(NetworkPolicy.allow_all(), vnet=True, guest_mtu=65520, uplink_mtu=1500) as lp:
        lp.send(_tcp_with_mss(GUEST, REMOTE, 40001, 80, 65480, 0x02))
        assert _mss_of(lp.recv_uplink()[10:]) == 65480  # the guest's own SYN: untouched
        synack = _tcp_with_mss(REMOTE, GUEST, 80, 40001, 1460, 0x12)
        lp.uplink.send(bytes(10) + synack)
        got = lp.recv_guest()
        assert _mss_of(got) == 65480 and checksums_ok(got)
        assert got[:50] == synack[:50] and got[52:57] == synack[52:57]
        # a peer that cannot take full 1500-byte segments keeps its own (smaller) MSS
        lp.send(_tcp_with_mss(GUEST, REMOTE, 40002, 80, 65480, 0x02))
        lp.recv_uplink()
        small = _tcp_with_mss(REMOTE, GUEST, 80, 40002, 1200, 0x12)
        lp.uplink.send(bytes(10) + small)
        assert lp.recv_guest() == small
        assert lp.counter("mss_raised", 1) == 1


def test_uplink_frames_larger_than_the_guest_mtu_are_dropped_never_truncated() -> None:
    with loop(NetworkPolicy.allow_all(), vnet=True, guest_mtu=1500, uplink_mtu=1500) as lp:
        lp.send(syn(sport=40003))
        lp.recv_uplink()
        fits = build_frame(REMOTE, GUEST, "tcp", 80, 40003, b"a" * 1460, flags=0x10)
        large = build_frame(REMOTE, GUEST, "tcp", 80, 40003, b"b" * 3000, flags=0x10)
        lp.uplink.send(bytes(10) + large)
        lp.uplink.send(bytes(10) + fits)
        assert lp.recv_guest() == fits
        assert lp.counter("too_big", 1) == 1
        # a header asking for a checksum (NEEDS_CSUM) gets it completed
        part = bytearray(build_frame(REMOTE, GUEST, "tcp", 80, 40003, b"c" * 100, flags=0x10))
        pseudo = bytes(part[26:34]) + struct.pack("!BBH", 0, 6, 120)
        part[50:52] = struct.pack("!H", _sum(pseudo))
        part[24:26] = struct.pack("!H", 0xFFFF - _sum(bytes(part[14:34])))
        lp.uplink.send(struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 16) + bytes(part))
        got = lp.recv_guest()
        assert checksums_ok(got) and got[54:] == b"c" * 100


def test_published_udp_port_admits_ingress_and_only_its_replies() -> None:
    """Uplink UDP to a published guest port is ingress-classified and delivered; the guest's
    answer passes although its egress policy denies everything; a datagram from
    the published port that answers nothing, and uplink UDP to other ports, do not."""
    policy = NetworkPolicy.custom(default_egress="deny", default_ingress="allow")
    with loop(policy, udp_published=(5300,)) as lp:
        q = build_frame(GW, GUEST, "udp", 40000, 5300, b"question")
        lp.uplink.send(q)
        assert lp.recv_guest() == q
        answer = build_frame(GUEST, GW, "udp", 5300, 40000, b"answer")
        lp.send(answer)
        assert lp.recv_uplink() == answer
        stray = build_frame(GUEST, GW, "udp", 5300, 40001, b"unasked")
        lp.send(stray)
        icmp = lp.recv_guest()
        assert icmp[23] == 1 and icmp[34:36] == b"\x03\x03"   # egress denied: unreachable
        assert lp.no_uplink()
        lp.uplink.send(build_frame(GW, GUEST, "udp", 40000, 5301, b"other port"))
        lp.uplink.send(build_frame(GW, GUEST, "tcp", 40000, 5300, flags=0x02))  # TCP: no
        time.sleep(0.2)
        assert lp.counter("not_reply", 2) == 2


def test_published_port_specs() -> None:
    from netstack.errors import GatewayError
    from netstack.gateway import PublishedPort

    assert PublishedPort.parse("5353:53/udp") == PublishedPort(5353, 53, "udp")
    assert PublishedPort.parse("8080:80/tcp") == PublishedPort.parse("8080:80")
    for bad in ("1:2/sctp", "1:2/", "a:2/udp"):
        with pytest.raises(GatewayError, match="host:guest"):
            PublishedPort.parse(bad)
    with pytest.raises(GatewayError, match="'tcp' or 'udp'"):
        PublishedPort(1, 2, "icmp")


# -- packets too big for the uplink: fragments or ICMP, never silence ------------------------
def _df(frame: bytes, df: bool = True) -> bytes:
    """``frame`` (IPv4, untagged) with the DF bit set (or cleared) and its IP checksum."""
    ip = bytearray(frame[14:14 + (frame[14] & 15) * 4])
    ip[6] = (ip[6] & ~0x40 & 0xFF) | (0x40 if df else 0)
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", 0xFFFF - _sum(bytes(ip)))
    return frame[:14] + bytes(ip) + frame[14 + len(ip):]


def _udp4_with_options(payload: bytes, options: bytes) -> bytes:
    udp = struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0) + payload
    ihl = 20 + len(options)
    ip = struct.pack("!BBHHHBBH", 0x40 | ihl // 4, 0, ihl + len(udp), 77, 0, 64, 17, 0) + \
        socket.inet_aton(GUEST) + socket.inet_aton(REMOTE) + options
    ip = ip[:10] + struct.pack("!H", 0xFFFF - _sum(ip)) + ip[12:]
    return GW_MAC + GUEST_MAC + b"\x08\x00" + ip + udp


def _reassemble(frags: list[bytes]) -> tuple[bytes, list[tuple[int, int, bool, int]]]:
    """The IP payload of IPv4 fragments (Ethernet frames), and (offset, length, MF, header
    length) per fragment; every header checksum is checked."""
    data = bytearray()
    shape = []
    for f in frags:
        ip = f[14:]
        ihl = (ip[0] & 15) * 4
        assert _sum(ip[:ihl]) == 0xFFFF
        total, flags_off = struct.unpack("!H", ip[2:4])[0], struct.unpack("!H", ip[6:8])[0]
        assert len(f) == 14 + total <= 14 + 1500 and not flags_off & 0x4000
        off = (flags_off & 0x1FFF) * 8
        assert off == len(data)
        data += ip[ihl:total]
        shape.append((off, total - ihl, bool(flags_off & 0x2000), ihl))
    return bytes(data), shape


@pytest.mark.parametrize("vnet", [False, True])
def test_ipv4_without_df_larger_than_the_uplink_is_fragmented(vnet: bool) -> None:
    payload = bytes(range(256)) * 15 + b"tail"                    # 3,844 bytes
    with loop(NetworkPolicy.allow_all(), mode="dgram", vnet=vnet, guest_mtu=9000,
              uplink_mtu=1500) as lp:
        frame = build_frame(GUEST, REMOTE, "udp", 5000, 6000, payload)
        lp.send(frame)
        frags = [lp.recv_uplink() for _ in range(3)]
        if vnet:
            assert all(f[:10] == bytes(10) for f in frags)
            frags = [f[10:] for f in frags]
        data, shape = _reassemble(frags)
        assert data == frame[34:]
        assert shape == [(0, 1480, True, 20), (1480, 1480, True, 20), (2960, 892, False, 20)]
        assert all(f[:14] == frame[:14] and f[18:20] == frame[18:20] for f in frags)  # same id
        assert lp.no_uplink(0.1)
        assert lp.counter("fragmented", 1) == 1 and lp.counter("to_uplink", 3) == 3
        # options: the first fragment keeps them all, the others only the copied ones
        # (router alert 0x94 is copied, record route 0x07 is not)
        options = b"\x94\x04\x00\x00" + b"\x07\x07\x04" + bytes(4) + b"\x00"
        framed = _udp4_with_options(payload[:2000], options)
        lp.send(framed)
        frags = [lp.recv_uplink()[10 if vnet else 0:] for _ in range(2)]
        data, shape = _reassemble(frags)
        assert data == framed[14 + 32:]
        assert shape == [(0, 1464, True, 32), (1464, 544, False, 24)]
        assert frags[0][34:46] == options and frags[1][34:38] == b"\x94\x04\x00\x00"
        # a first fragment (MF set) is cut further: its last piece keeps MF
        frag = bytearray(build_frame(GUEST, REMOTE, "udp", 1, 2, bytes(2000)))
        frag[20:22] = b"\x20\x00"
        lp.send(bytes(frag))
        data, shape = _reassemble([lp.recv_uplink()[10 if vnet else 0:] for _ in range(2)])
        assert data == frag[34:] and shape == [(0, 1480, True, 20), (1480, 528, True, 20)]
        assert lp.counter("fragmented", 3) == 3


def _icmp4_ok(icmp: bytes) -> None:
    assert icmp[:6] == GUEST_MAC and checksums_ok(icmp) and icmp[23] == 1
    assert icmp[20] & 0x40  # the ICMP error itself has DF (it is small)


@pytest.mark.parametrize(("proto", "vnet"), [("udp", True), ("udp", False), ("icmpv4", True),
                                             ("tcp", False)])
def test_ipv4_with_df_larger_than_the_uplink_gets_frag_needed(proto: str, vnet: bool) -> None:
    """DF set: ICMP type 3 code 4 with next-hop MTU = the uplink's, quoting the packet's
    first 548 bytes (RFC 1812), from the gateway's address; TCP too when the uplink
    cannot take GSO packets (a plain TAP)."""
    with loop(NetworkPolicy.allow_all(), vnet=vnet, guest_mtu=9000, uplink_mtu=1400,
              gateway_ip=GW) as lp:
        kw: dict[str, Any] = {"flags": 0x10} if proto == "tcp" else {}
        frame = _df(build_frame(GUEST, REMOTE, proto, 5000, 6000, bytes(range(256)) * 16,
                                **kw))
        lp.send(frame)
        icmp = lp.recv_guest()
        _icmp4_ok(icmp)
        assert socket.inet_ntoa(icmp[26:30]) == GW and socket.inet_ntoa(icmp[30:34]) == GUEST
        typ, code, _csum, unused, mtu = struct.unpack("!BBHHH", icmp[34:42])
        assert (typ, code, unused, mtu) == (3, 4, 0, 1400)
        assert icmp[42:] == frame[14:14 + 548] and len(icmp) == 14 + 576
        assert lp.no_uplink(0.1)
        assert lp.counter("frag_needed", 1) == 1 and lp.stats().fragmented == 0
        # a packet that fits still leaves as it is
        small = _df(build_frame(GUEST, REMOTE, proto, 5000, 6000, bytes(1000), **kw))
        lp.send(small)
        assert lp.recv_uplink()[10 if vnet else 0:] == small


def test_frag_needed_without_a_gateway_address_comes_from_the_destination() -> None:
    with loop(NetworkPolicy.allow_all(), guest_mtu=9000, uplink_mtu=1500) as lp:
        frame = _df(build_frame(GUEST, REMOTE, "udp", 5000, 6000, bytes(2000)))
        lp.send(frame)
        icmp = lp.recv_guest()
        _icmp4_ok(icmp)
        assert socket.inet_ntoa(icmp[26:30]) == REMOTE and icmp[34:36] == b"\x03\x04"


def _icmp6_sum_ok(frame: bytes) -> bool:
    plen = struct.unpack("!H", frame[18:20])[0]
    pseudo = frame[22:54] + struct.pack("!IxxxB", plen, 58)
    return _sum(pseudo + frame[54:54 + plen]) == 0xFFFF


@pytest.mark.parametrize("gw6", [None, "fd42:6d73:62::1"])
def test_ipv6_larger_than_the_uplink_gets_packet_too_big(gw6: str | None) -> None:
    """IPv6 is never fragmented on the way: ICMPv6 type 2 with MTU = the uplink's, the
    whole error within 1280 bytes (quoting 1232 of the packet)."""
    guest6, remote6 = "fd42:6d73:62::2", "2001:db8::10"
    with loop(NetworkPolicy.allow_all(), mode="dgram", vnet=True, guest_mtu=9000,
              uplink_mtu=1500, gateway_ip6=gw6) as lp:
        frame = build_frame(guest6, remote6, "udp", 5000, 6000, bytes(range(256)) * 12)
        lp.send(frame)
        err = lp.recv_guest()
        assert len(err) == 14 + 1280 and err[12:14] == b"\x86\xdd" and err[20] == 58
        assert err[22:38] == socket.inet_pton(socket.AF_INET6, gw6 or remote6)
        assert err[38:54] == socket.inet_pton(socket.AF_INET6, guest6)
        typ, code, _csum, mtu = struct.unpack("!BBHI", err[54:62])
        assert (typ, code, mtu) == (2, 0, 1500) and _icmp6_sum_ok(err)
        assert err[62:] == frame[14:14 + 1232]
        # TCP with an extension header cannot be a GSO packet: packet too big as well
        tcp = build_frame(guest6, remote6, "tcp", 5000, 443, bytes(3000), flags=0x10)
        hop = bytearray(tcp[:14] + tcp[14:54] + b"\x06\x00" + bytes(6) + tcp[54:])
        hop[20] = 0                                          # next header: hop-by-hop
        hop[18:20] = struct.pack("!H", len(hop) - 54)
        lp.send(bytes(hop))
        err = lp.recv_guest()
        assert err[54] == 2 and _icmp6_sum_ok(err) and err[62:] == bytes(hop[14:14 + 1232])
        assert lp.no_uplink(0.1) and lp.counter("frag_needed", 2) == 2


def test_oversize_packets_that_deserve_no_icmp_are_counted_not_answered() -> None:
    """No ICMP error about an ICMP(v6) error or an IPv4 multicast/broadcast destination
    (RFC 1122, 1812, 4443): dropped and counted."""
    with loop(NetworkPolicy.allow_all(), vnet=True, guest_mtu=9000, uplink_mtu=1500) as lp:
        error = build_frame(GUEST, REMOTE, "icmpv4", payload=bytes(3000), icmp_type=3)
        mcast = build_frame(GUEST, "239.1.2.3", "udp", 5000, 6000, bytes(3000))
        bcast = build_frame(GUEST, "255.255.255.255", "udp", 5000, 6000, bytes(3000))
        for frame in (error, mcast, bcast):
            lp.send(_df(frame))
        assert lp.counter("oversize_dropped", 3) == 3
        assert lp.stats().frag_needed == 0
        lp.send(build_frame("fd42:6d73:62::2", "2001:db8::10", "icmpv6", payload=bytes(3000),
                            icmp_type=1))           # an ICMPv6 error (destination unreachable)
        assert lp.counter("oversize_dropped", 4) == 4
        with pytest.raises(TimeoutError):
            lp.recv_guest(0.2)
        assert lp.no_uplink(0.1)


def test_build_too_big_directly() -> None:
    out = ffi.new("uint8_t[]", 1500)
    gw16 = socket.inet_pton(socket.AF_INET6, "::ffff:" + GW)
    frame = _df(build_frame(GUEST, REMOTE, "udp", 1, 2, bytes(100)))
    n = lib.ns_gw_build_too_big(frame, len(frame), 576, gw16, out, 1500)
    icmp = bytes(out[0:n])
    assert checksums_ok(icmp) and icmp[34:36] == b"\x03\x04" and icmp[40:42] == b"\x02\x40"
    assert icmp[42:] == frame[14:] and socket.inet_ntoa(icmp[26:30]) == GW
    # a v6 source for a v4 packet (or none) falls back to the packet's destination
    v6 = socket.inet_pton(socket.AF_INET6, "fd00::1")
    for src in (v6, ffi.NULL, bytes(16)):
        n = lib.ns_gw_build_too_big(frame, len(frame), 1500, src, out, 1500)
        assert socket.inet_ntoa(bytes(out[26:30])) == REMOTE
    # nothing for junk, ARP-sized frames, or a buffer too small
    assert lib.ns_gw_build_too_big(b"junk", 4, 1500, ffi.NULL, out, 1500) == 0
    assert lib.ns_gw_build_too_big(frame, len(frame), 1500, ffi.NULL, out, 60) == 0


def test_dns_over_tcp_without_the_uplinks_dnat_is_reset() -> None:
    """An uplink without redirects (dns_tcp_reset): guest TCP/53 gets a RST instead of
    leaving past the forwarder; UDP DNS still goes to the owner."""
    with loop(NetworkPolicy.allow_all(), dns_tcp_reset=True) as lp:
        lp.send(syn(dst=REMOTE, dport=53))
        rst = lp.recv_guest()
        assert checksums_ok(rst) and rst[47] & 0x04
        assert lp.no_uplink(0.1)
    with loop(NetworkPolicy.allow_all()) as lp:
        lp.send(syn(dst=REMOTE, dport=53))
        assert lp.recv_uplink() == syn(dst=REMOTE, dport=53)
