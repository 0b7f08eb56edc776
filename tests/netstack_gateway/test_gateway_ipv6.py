"""End to end over IPv6: guest netns with the plan's ULA address -> fake VMM -> the C
gateway -> TapUplink with NAT66 -> host -> upstream netns on 2001:db8:100::10 (the
documentation prefix, standing in for a public host). Neighbour discovery, TCP, UDP DNS
and DNS over TCP to the gateway's IPv6 address, ICMPv6 echo, policy denies.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netstack import NetworkPolicy, Rule
from netstack.errors import UplinkError
from netstack.gateway import AddressPlan, Gateway, TapUplink, cleanup_stale
from netstack.gateway._uplink_tap import host_ipv6_usable
from tests.netstack_gateway.topology import (
    UPSTREAM_DNS_IP,
    UPSTREAM_IP6,
    UPSTREAM_NAME6,
    Topology,
    uplink_and_topology,
)
from tests.support import require_binaries, require_root

pytestmark = pytest.mark.timeout(60)


class Rig6:
    def __init__(self, topo: Topology, uplink: TapUplink) -> None:
        self.topo, self.uplink = topo, uplink

    def gateway(self, policy: NetworkPolicy, **kw: object) -> Gateway:
        assert self.topo.vmm_socket is not None
        return Gateway(policy, uplink=self.uplink, guest_fd=self.topo.vmm_socket.fileno(),
                       dns_upstreams=[UPSTREAM_DNS_IP], **kw)  # type: ignore[arg-type]

    def curl(self, *args: str) -> tuple[int, str, float]:
        t0 = time.monotonic()
        r = self.topo.run_in_guest(["curl", "-sS", "--max-time", "8", *args], timeout=20)
        return r.returncode, r.stdout + r.stderr, time.monotonic() - t0

    def dig6(self, name: str, *extra: str) -> str:
        gw6 = str(self.topo.plan.gateway_ipv6)
        r = self.topo.run_in_guest(["dig", f"@{gw6}", "+time=3", "+tries=1", *extra, name,
                                    "AAAA"])
        return r.stdout + r.stderr


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig6]:
    require_root()
    require_binaries("ip", "nft", "curl", "dig", "ping")
    if not host_ipv6_usable():
        pytest.skip("IPv6 is disabled on this host (net.ipv6.conf.all.disable_ipv6)")
    with uplink_and_topology("gw-e2e6", AddressPlan(3230, ipv6=True),
                             tmp_path_factory.mktemp("gwe2e6"), "6", vnet_hdr=True
                             ) as (uplink, topo):
        assert uplink.ipv6_egress
        yield Rig6(topo, uplink)


def test_namespace_ipv6_sysctls(rig: Rig6) -> None:
    """Set by TapUplink through netstack.gateway._netns: the namespace forwards IPv6
    and never lets the guest's link steer its routing (RAs, redirects)."""
    n = rig.uplink.names

    def ns_sysctl(path: str) -> str:
        return subprocess.run(["ip", "netns", "exec", n["netns"], "cat", f"/proc/sys/{path}"],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert ns_sysctl("net/ipv6/conf/all/forwarding") == "1"
    assert ns_sysctl(f"net/ipv6/conf/{n['tap']}/accept_ra") == "0"
    assert ns_sysctl(f"net/ipv6/conf/{n['tap']}/accept_redirects") == "0"


def test_public_ipv6_reached_private_ipv6_fails_fast(rig: Rig6) -> None:
    with rig.gateway(NetworkPolicy.public_only()) as gw:
        rc, out, _ = rig.curl(f"http://[{UPSTREAM_IP6}]/v6")
        assert rc == 0 and out.startswith("hello from upstream /v6"), out
        rc, out, took = rig.curl("http://[fd00:1234::5]/")  # ULA = private: RST
        assert rc == 7 and took < 5, out
        assert gw.stats()["rst_sent"] >= 1


def test_icmpv6_echo_to_allowed_destination(rig: Rig6) -> None:
    with rig.gateway(NetworkPolicy.public_only()):
        r = rig.topo.run_in_guest(["ping", "-6", "-c", "1", "-W", "3", UPSTREAM_IP6])
        assert r.returncode == 0, r.stdout + r.stderr
        r = rig.topo.run_in_guest(["ping", "-6", "-c", "1", "-W", "2", "fd00:1234::5"])
        assert r.returncode != 0


def test_ipv6_too_big_for_the_uplink_gets_packet_too_big(rig: Rig6) -> None:
    """The default guest link (65520) is larger than the uplink (1500): ICMPv6 Packet Too
    Big from the gateway's address, and the guest learns the path MTU."""
    rig.topo.run_in_guest(["ip", "-6", "route", "flush", "cache"])
    try:
        with rig.gateway(NetworkPolicy.public_only()) as gw:
            r = rig.topo.run_in_guest(["ping", "-6", "-c", "1", "-W", "3", "-s", "3000", "-M",
                                       "do", UPSTREAM_IP6])
            out = r.stdout + r.stderr
            assert "Packet too big: mtu=1500" in out, out
            assert f"From {rig.topo.plan.gateway_ipv6}" in out, out
            assert gw.stats()["frag_needed"] == 1
            r = rig.topo.run_in_guest(["ip", "-6", "route", "get", UPSTREAM_IP6])
            assert "mtu 1500" in r.stdout, r.stdout + r.stderr
    finally:
        rig.topo.run_in_guest(["ip", "-6", "route", "flush", "cache"])


def test_dns_over_ipv6_udp_and_tcp(rig: Rig6) -> None:
    with rig.gateway(NetworkPolicy.public_only(), rebind_protection=False):
        assert rig.dig6(UPSTREAM_NAME6, "+short").strip() == UPSTREAM_IP6
        assert rig.dig6(UPSTREAM_NAME6, "+tcp", "+short").strip() == UPSTREAM_IP6


def test_domain_rule_over_ipv6_by_dns_pin(rig: Rig6) -> None:
    policy = NetworkPolicy.custom(rules=[Rule.allow(UPSTREAM_NAME6, protocol="tcp")])
    with rig.gateway(policy, rebind_protection=False):
        rc, out, took = rig.curl(f"http://[{UPSTREAM_IP6}]/before")
        assert rc == 7 and took < 5, out  # no answer has named the address yet
        assert "status: NXDOMAIN" in rig.dig6("other.upstream.test")
        assert rig.dig6(UPSTREAM_NAME6, "+short").strip() == UPSTREAM_IP6
        rc, out, _ = rig.curl(f"http://[{UPSTREAM_IP6}]/after")
        assert rc == 0 and out.startswith("hello from upstream /after"), out


def test_ipv6_egress_arguments(rig: Rig6, tmp_path: Path) -> None:
    with pytest.raises(UplinkError, match="needs a plan with IPv6"):
        TapUplink("gw-e2e6-bad", AddressPlan(3231), ipv6_egress=True, home=tmp_path)
    with pytest.raises(UplinkError, match="True, False or None"):
        TapUplink("gw-e2e6-bad", AddressPlan(3231, ipv6=True), ipv6_egress="yes",  # type: ignore[arg-type]
                  home=tmp_path)


def test_without_ipv6_egress_aaaa_is_answered_empty(rig: Rig6, tmp_path: Path) -> None:
    # the same guest (same plan) behind another uplink of that slot without NAT66; closes
    # the module's uplink, so this test stays the last of the module
    plan, topo = rig.topo.plan, rig.topo
    rig.uplink.close()
    try:
        with TapUplink("gw-e2e6-off", plan, home=tmp_path, ipv6_egress=False) as up:
            assert not up.ipv6_egress
            assert topo.vmm_socket is not None
            with Gateway(NetworkPolicy.public_only(), uplink=up,
                         guest_fd=topo.vmm_socket.fileno(), dns_upstreams=[UPSTREAM_DNS_IP],
                         rebind_protection=False):
                r = topo.run_in_guest(["dig", f"@{plan.gateway_ipv6}", "+time=3", "+tries=1",
                                       UPSTREAM_NAME6, "AAAA"])
                assert "status: NOERROR" in r.stdout and "ANSWER: 0" in r.stdout, r.stdout
                t0 = time.monotonic()
                r = topo.run_in_guest(["curl", "-sS", "--max-time", "5",
                                       f"http://[{UPSTREAM_IP6}]/"])
                assert r.returncode != 0 and time.monotonic() - t0 < 5, r.stdout + r.stderr
    finally:
        cleanup_stale(tmp_path)
