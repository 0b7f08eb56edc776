"""The ``Uplink`` protocol: a Gateway on a user-defined uplink (no root), typed errors for
objects that are not uplinks, and a clean close with a DNS query in flight.

The user-defined uplink here is a datagram socket pair (one datagram = one frame, a
TAP's semantics) with a virtio-net header: the default guest link (MTU 65520) works on
it as on the TAP uplink. It has no redirect capability, so DNS over TCP is reset and
published ports / TLS interception are refused.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from netstack import NetworkPolicy, build_frame
from netstack.errors import GatewayError
from netstack.gateway import (
    SANDBOX_GUEST_MTU,
    AddressPlan,
    Gateway,
    RedirectingUplink,
    TapUplink,
    Uplink,
    has_redirects,
    missing_uplink_members,
)
from tests.netstack_gateway.test_gateway_loop import checksums_ok

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parents[2]
REMOTE = "198.51.100.10"


class PairUplink:
    """A user-space uplink: frames over a SOCK_DGRAM socket pair; ``outside`` is the
    network's end."""

    def __init__(self, plan: AddressPlan, *, vnet_hdr: bool = True) -> None:
        self.plan = plan
        self.vnet_hdr = vnet_hdr
        self.ipv6_egress = False
        self._mtu = 1500
        self.outside, self._inside = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.closes = 0

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def tap_fd(self) -> int:
        return self._inside.fileno()

    def set_mtu(self, mtu: int) -> None:
        self._mtu = mtu

    def close(self) -> None:
        self.closes += 1
        self._inside.close()
        self.outside.close()

    def recv(self, timeout: float = 2.0) -> bytes:
        self.outside.settimeout(timeout)
        data = self.outside.recv(70000)
        return data[10:] if self.vnet_hdr else data

    def send(self, frame: bytes) -> None:
        self.outside.send((bytes(10) if self.vnet_hdr else b"") + frame)


@contextmanager
def gateway_on(up: PairUplink, policy: NetworkPolicy | None = None
               ) -> Iterator[tuple[Gateway, socket.socket]]:
    vmm, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with Gateway(policy or NetworkPolicy.public_only(), uplink=up, guest_socket=mine,
                     transport="dgram", dns_upstreams=["192.0.2.53"]) as gw:
            yield gw, vmm
    finally:
        vmm.close()


def _guest_frame(plan: AddressPlan, dst: str, proto: str, dport: int, payload: bytes = b"",
                 **kw: int) -> bytes:
    f = build_frame(str(plan.guest_ipv4), dst, proto, 40000, dport, payload, **kw)
    mac = bytes.fromhex(plan.gateway_mac.replace(":", "")) + \
        bytes.fromhex(plan.guest_mac.replace(":", ""))
    return mac + f[12:]


def test_the_protocol_is_satisfied_by_the_tap_uplink_and_a_user_class() -> None:
    assert has_redirects(TapUplink)   # an instance is checked in test_gateway_e2e.py
    up = PairUplink(AddressPlan(9))
    try:
        assert isinstance(up, Uplink) and missing_uplink_members(up) == []
        assert not isinstance(up, RedirectingUplink) and not has_redirects(up)
    finally:
        up.close()


@pytest.mark.parametrize(("bad", "missing"), [
    (None, "plan, mtu, vnet_hdr, ipv6_egress, tap_fd, set_mtu, close"),
    ("eth0", "plan, mtu, vnet_hdr, ipv6_egress, tap_fd, set_mtu, close"),
])
def test_a_non_uplink_is_a_typed_error_naming_the_missing_members(bad: object,
                                                                   missing: str) -> None:
    with pytest.raises(GatewayError, match=rf"uplink must implement netstack.gateway.Uplink "
                                           rf"\(missing: {missing}\), got"):
        Gateway(NetworkPolicy.none(), uplink=bad, guest_fd=0)  # type: ignore[arg-type]


def test_an_uplink_missing_one_member_is_named() -> None:
    class NoClose(PairUplink):
        close = None  # type: ignore[assignment]

    up = NoClose(AddressPlan(10))
    try:
        with pytest.raises(GatewayError, match=r"\(missing: close\), got NoClose"):
            Gateway(NetworkPolicy.none(), uplink=up, guest_fd=0)
    finally:
        PairUplink.close(up)
    up2 = PairUplink(AddressPlan(10))
    up2.plan = "slot 10"  # type: ignore[assignment]
    try:
        with pytest.raises(GatewayError, match=r"uplink\.plan must be an AddressPlan, got str"):
            Gateway(NetworkPolicy.none(), uplink=up2, guest_fd=0)
    finally:
        up2.close()


def test_gateway_on_a_user_defined_uplink_with_the_default_guest_link() -> None:
    plan = AddressPlan(11)
    assert plan.mtu == SANDBOX_GUEST_MTU == 65520
    up = PairUplink(plan)
    with gateway_on(up) as (gw, vmm):
        assert gw.guest_config()["mtu"] == 65520 and up.mtu == 1500
        syn = _guest_frame(plan, REMOTE, "tcp", 80, flags=0x02)
        vmm.send(syn)
        assert up.recv() == syn                                   # allowed: to the uplink
        reply = build_frame(REMOTE, str(plan.guest_ipv4), "tcp", 80, 40000, flags=0x12)
        up.send(reply)
        vmm.settimeout(2)
        assert vmm.recv(70000) == reply                           # its reply comes back
        vmm.send(_guest_frame(plan, "10.0.0.1", "tcp", 80, flags=0x02))
        assert vmm.recv(70000)[47] & 0x04                         # private: denied, RST
        # no redirects: DNS over TCP is reset rather than leaving past the forwarder
        vmm.send(_guest_frame(plan, REMOTE, "tcp", 53, flags=0x02))
        rst = vmm.recv(70000)
        assert checksums_ok(rst) and rst[47] & 0x04
        # a UDP datagram with DF above the uplink's MTU: frag-needed from the gateway
        big = bytearray(_guest_frame(plan, REMOTE, "udp", 9999, bytes(4000)))
        big[20] |= 0x40
        vmm.send(bytes(big))
        icmp = vmm.recv(70000)
        assert icmp[34:36] == b"\x03\x04" and struct.unpack("!H", icmp[40:42])[0] == 1500
        assert socket.inet_ntoa(icmp[26:30]) == str(plan.gateway_ipv4)
        stats = gw.stats()
        assert stats["frag_needed"] == 1 and stats["fragmented"] == 0
        with pytest.raises(GatewayError, match="intercept_tls needs an uplink with socket"):
            gw.intercept_tls([443])
    assert up.closes == 0                                         # not own_uplink
    up.close()


def test_published_ports_need_the_redirect_capability_and_own_uplink_is_closed() -> None:
    up = PairUplink(AddressPlan(12))
    with pytest.raises(GatewayError, match="published_ports need an uplink with socket"):
        Gateway(NetworkPolicy.none(), uplink=up, guest_fd=0, published_ports=["8080:80"])
    up.close()
    up = PairUplink(AddressPlan(12), vnet_hdr=False)
    with pytest.raises(GatewayError, match="needs an uplink with vnet_hdr"):
        Gateway(NetworkPolicy.none(), uplink=up, guest_fd=0)       # 65520 guest link
    vmm, mine = socket.socketpair()
    with Gateway(NetworkPolicy.none(), uplink=up, guest_socket=mine, mtu=1500,
                 own_uplink=True, dns_upstreams=["192.0.2.53"]):
        pass
    vmm.close()
    assert up.closes == 1


_CLOSE_IN_FLIGHT = r"""
import logging, socket, sys, time
logging.basicConfig(level=logging.WARNING)
sys.path.insert(0, sys.argv[1])
from netstack import NetworkPolicy
from netstack.gateway import AddressPlan, Gateway
from tests.netstack_gateway.test_uplink_protocol import PairUplink, _guest_frame

sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # an upstream that never answers
sink.bind(("127.0.0.1", 0))
plan = AddressPlan(13)
up = PairUplink(plan)
vmm, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
gw = Gateway(NetworkPolicy.allow_all(), uplink=up, guest_socket=mine, transport="dgram",
             dns_upstreams=[("127.0.0.1", sink.getsockname()[1])], dns_timeout=5.0)
query = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
for i in range(4):
    vmm.send(_guest_frame(plan, str(plan.gateway_ipv4), "udp", 53, query))
deadline = time.monotonic() + 5
while gw.stats()["dns_queries"] < 4 and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.2)                                            # the queries reach the upstream
assert gw.stats()["dns_queries"] == 4
gw.close()
del gw
import gc; gc.collect()
up.close()
print("closed", flush=True)
"""


def test_close_with_dns_queries_in_flight_is_clean() -> None:
    """``Gateway.close()`` while the forwarder waits for an upstream: no "Event loop is
    closed", no "Task was destroyed but it is pending!" (issue 13)."""
    r = subprocess.run([sys.executable, "-c", _CLOSE_IN_FLIGHT, str(ROOT)], cwd=ROOT,
                       capture_output=True, text=True, timeout=25)
    assert r.returncode == 0 and r.stdout == "closed\n", r.stderr[-2000:]
    for bad in ("Event loop is closed", "Task was destroyed", "Traceback", "never awaited",
                "DNS query from"):
        assert bad not in r.stderr, textwrap.shorten(r.stderr, 2000)
