"""The end-to-end plumbing the C gateway will sit in, proven with an allow-all Python relay.

guest netns (curl, dig) -> fake VMM -> u32-BE stream -> relay -> TapUplink -> NAT ->
upstream netns (HTTP, HTTPS with a test CA, DNS). Also: the host loopback (``host``
group) path, its absence by default, and the DNS forwarder against the namespace's
authoritative server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from netstack import NetworkPolicy, Rule
from netstack.gateway import AddressPlan, DnsForwarder, TapUplink, cleanup_stale
from tests.netstack_gateway.kernel_objects import snapshot
from tests.netstack_gateway.topology import (
    UPSTREAM_DNS_IP,
    UPSTREAM_IP,
    UPSTREAM_NAME,
    StreamTapPump,
    Topology,
    host_loopback_http,
    uplink_and_topology,
)
from tests.support import require_binaries, require_root

pytestmark = pytest.mark.timeout(60)


class Rig:
    def __init__(self, topo: Topology, uplink: TapUplink, relay: StreamTapPump) -> None:
        self.topo, self.uplink, self.relay = topo, uplink, relay


def build_rig(tmp: Path, name: str, slot: int, host_loopback: bool, upstream: bool = True
              ) -> Iterator[Rig]:
    require_root()
    require_binaries("ip", "nft", "curl", "dig")
    # a Python relay of bare frames: a 1500-byte guest link and a TAP without vnet headers
    with uplink_and_topology(name, AddressPlan(slot, mtu=1500), tmp, f"{slot % 16:x}",
                             upstream=upstream, host_loopback=host_loopback,
                             vnet_hdr=False) as (uplink, topo):
        assert topo.vmm_socket is not None
        relay = StreamTapPump(topo.vmm_socket, uplink.tap_fd, name="relay")
        try:
            yield Rig(topo, uplink, relay)
        finally:
            relay.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    yield from build_rig(tmp_path_factory.mktemp("topo"), "gw-topo-lo", 3101, True)


@pytest.fixture
def strict_rig(tmp_path: Path) -> Iterator[Rig]:
    # no upstream namespace: the module-scoped rig already routes the TEST-NETs
    yield from build_rig(tmp_path, "gw-topo-strict", 3102, False, upstream=False)


@pytest.fixture(scope="module")
def host_service() -> Iterator[int]:
    """An HTTP service on the host's 127.0.0.1 (what the ``host`` group reaches)."""
    with host_loopback_http() as port:
        yield port


def curl(rig: Rig, *args: str, max_time: int = 10) -> tuple[int, str]:
    r = rig.topo.run_in_guest(["curl", "-sS", "--max-time", str(max_time), *args],
                              timeout=max_time + 10)
    return r.returncode, r.stdout + r.stderr


def test_http_through_the_relay_is_natted(rig: Rig) -> None:
    rc, out = curl(rig, f"http://{UPSTREAM_IP}/from-guest")
    assert rc == 0, out
    # the upstream sees the host's address on its veth: the guest's traffic was NATed
    assert out == f"hello from upstream /from-guest client={rig.topo.upstream_host_end}\n"
    assert rig.relay.frames["to_tap"] > 0 and rig.relay.frames["to_stream"] > 0
    assert not rig.relay.errors and rig.topo.vmm is not None and not rig.topo.vmm.errors


def test_https_with_test_ca(rig: Rig) -> None:
    rc, out = curl(rig, "--cacert", str(rig.topo.ca_file), "--resolve",
                   f"{UPSTREAM_NAME}:443:{UPSTREAM_IP}", f"https://{UPSTREAM_NAME}/tls")
    assert rc == 0, out
    assert out.startswith("hello from upstream /tls")


def test_bulk_download_full_size_frames(rig: Rig) -> None:
    n = 4_000_000
    rc, out = curl(rig, "-o", "/dev/null", "-w", "%{size_download}",
                   f"http://{UPSTREAM_IP}/big?n={n}")
    assert rc == 0 and out == str(n), out


def test_dig_from_guest_to_upstream_dns(rig: Rig) -> None:
    r = rig.topo.run_in_guest(["dig", f"@{UPSTREAM_DNS_IP}", "+time=5", "+tries=1", "+short",
                               "alias.upstream.test", "A"])
    assert r.stdout.split() == ["web.upstream.test.", UPSTREAM_IP], r.stdout + r.stderr
    r = rig.topo.run_in_guest(["dig", f"@{UPSTREAM_DNS_IP}", "+tcp", "+time=5", "+tries=1",
                               "+short", UPSTREAM_NAME])
    assert r.stdout.split() == [UPSTREAM_IP]


def test_gateway_reaches_host_loopback_when_asked(rig: Rig, host_service: int) -> None:
    gw = rig.topo.plan.gateway_ipv4
    rc, out = curl(rig, f"http://{gw}:{host_service}/")
    assert rc == 0 and out == "hello from the host loopback\n", out
    # the host's own addresses stay closed: only the DNAT to 127.0.0.1 is let in
    rc, out = curl(rig, f"http://{rig.topo.upstream_host_end}:{host_service}/", max_time=2)
    assert rc != 0


def test_host_loopback_is_closed_by_default(strict_rig: Rig, host_service: int) -> None:
    gw = strict_rig.topo.plan.gateway_ipv4
    rc, out = curl(strict_rig, f"http://{gw}:{host_service}/", max_time=2)
    assert rc != 0, out
    # the path itself works: the guest resolved the gateway's MAC through the relay
    neigh = strict_rig.topo.run_in_guest(["ip", "neigh", "show", str(gw)]).stdout
    assert strict_rig.topo.plan.gateway_mac in neigh, neigh
    assert strict_rig.relay.frames["to_tap"] > 0


def test_forwarder_against_namespace_dns(rig: Rig) -> None:
    """The forwarder (host side) resolves through the upstream namespace's server; the
    TEST-NET answer is a reserved address, so rebind protection needs an address rule."""
    q = dns.message.make_query(UPSTREAM_NAME, "A")
    pins: list[object] = []
    default = DnsForwarder(NetworkPolicy.allow_all().evaluate_dns, [UPSTREAM_DNS_IP], timeout=3)
    r = dns.message.from_wire(asyncio.run(default.handle(q.to_wire())) or b"")
    assert r.rcode() == dns.rcode.NXDOMAIN  # rebind protection
    policy = NetworkPolicy.custom(rules=[Rule.allow("198.51.100.0/24"), Rule.allow("*")])
    fwd = DnsForwarder(policy.evaluate_dns, [UPSTREAM_DNS_IP], timeout=3,
                       on_answer=lambda n, ips: pins.append((n, ips)))
    r = dns.message.from_wire(asyncio.run(fwd.handle(q.to_wire(), "tcp")) or b"")
    assert r.rcode() == dns.rcode.NOERROR
    assert pins == [(UPSTREAM_NAME, [(UPSTREAM_IP, 60)])]


# -- the other VMM transports (no upstream namespace: the host loopback path is the target) --
@contextlib.contextmanager
def transport_rig(tmp: Path, name: str, slot: int, mode: str, vfkit: bool = False,
                  listen: bool = False) -> Iterator[Rig]:
    require_root()
    require_binaries("ip", "nft", "curl")
    before = snapshot()
    home = tmp / "home"
    plan = AddressPlan(slot, mtu=1500)   # a Python relay of bare frames
    uplink = topo = relay = None
    server: socket.socket | None = None
    try:
        uplink = TapUplink(name, plan, host_loopback=True, home=home, vnet_hdr=False)
        kind = socket.SOCK_STREAM if mode == "stream" else socket.SOCK_DGRAM
        path = tmp / "gateway.sock"
        if listen:  # the gateway listens, the VMM connects (QEMU server=off, libkrun)
            server = socket.socket(socket.AF_UNIX, kind)
            server.bind(str(path))
            if kind == socket.SOCK_STREAM:
                server.listen(1)
        topo = Topology(plan, tmp, token=f"{os.getpid() % 0xFFFF:04x}{slot % 16:x}",
                        upstream=False, mode=mode, vfkit=vfkit,
                        vmm_connect=path if listen else None)
        if server is not None and kind == socket.SOCK_STREAM:
            gw_sock, _ = server.accept()
        elif server is not None:
            gw_sock = server
            gw_sock.connect(str(tmp / f"vmm-{topo.token}.sock"))
        else:
            assert topo.vmm_socket is not None
            gw_sock = topo.vmm_socket
        relay = StreamTapPump(gw_sock, uplink.tap_fd, name="relay", mode=mode)
        yield Rig(topo, uplink, relay)
    finally:
        if relay is not None:
            relay.stop()
            if relay.sock is not server and relay.sock is not (topo and topo.vmm_socket):
                relay.sock.close()
        if topo is not None:
            topo.close()
        if server is not None:
            server.close()
        if uplink is not None:
            uplink.close()
        cleanup_stale(home)
        assert snapshot().ours() == before.ours()


@pytest.mark.parametrize(("mode", "vfkit", "listen"), [
    ("dgram", False, False), ("dgram", True, False), ("stream", False, True),
    ("dgram", True, True)])
def test_vmm_transports(tmp_path: Path, host_service: int, mode: str, vfkit: bool,
                        listen: bool) -> None:
    with transport_rig(tmp_path, "gw-topo-tr", 3103, mode, vfkit, listen) as rig:
        rc, out = curl(rig, f"http://{rig.topo.plan.gateway_ipv4}:{host_service}/")
        assert rc == 0 and out == "hello from the host loopback\n", out
        assert rig.relay.handshake == (b"VFKT" if vfkit else None)
        assert not rig.relay.errors and rig.topo.vmm is not None and not rig.topo.vmm.errors
