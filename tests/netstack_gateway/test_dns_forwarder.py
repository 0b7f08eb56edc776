"""DnsForwarder against a real authoritative server on 127.0.0.1, with dig and dnspython."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from netstack import Decision, NetworkPolicy, Rule
from netstack.errors import DnsForwarderError
from netstack.gateway import DnsForwarder
from netstack.gateway._dns_forwarder import (
    ForwarderThread,
    Upstream,
    is_rebind_address,
    resolv_conf_upstreams,
)
from tests.netstack_gateway.dns_server import AuthServer
from tests.support import require_binaries

pytestmark = pytest.mark.timeout(60)

ALLOW_ALL = NetworkPolicy.allow_all()


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A UDP+TCP endpoint that accepts and never answers (a slow/dead resolver)."""
    server = AuthServer(blackhole=True)
    try:
        yield server.upstream
    finally:
        server.close()


def ask(fwd: DnsForwarder, name: str, rdtype: str = "A", protocol: str = "udp",
        **kw: object) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    wire = asyncio.run(fwd.handle(q.to_wire(), protocol))
    assert wire is not None
    r = dns.message.from_wire(wire)
    assert r.id == q.id
    return r


def addresses(r: dns.message.Message) -> list[str]:
    return sorted(str(rd.address) for rrset in r.answer
                  if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rd in rrset)


# -- policy -------------------------------------------------------------------------
def test_allowed_name_is_forwarded_and_reported(auth: AuthServer) -> None:
    seen: list[tuple[str, list[tuple[str, int]]]] = []
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream],
                       on_answer=lambda n, ips: seen.append((n, ips)))
    r = ask(fwd, "a.example.test")
    assert r.rcode() == dns.rcode.NOERROR and addresses(r) == ["93.184.216.34"]
    assert r.flags & dns.flags.RA and r.flags & dns.flags.QR
    assert seen == [("a.example.test", [("93.184.216.34", 300)])]
    assert auth.queries == [("a.example.test", "A", "udp")]


def test_denied_name_is_nxdomain_logged_and_never_forwarded(
        auth: AuthServer, caplog: pytest.LogCaptureFixture) -> None:
    policy = NetworkPolicy.custom(rules=[Rule.allow("a.example.test")])
    fwd = DnsForwarder(policy.evaluate_dns, [auth.upstream])
    with caplog.at_level(logging.INFO, logger="netstack.dns"):
        assert ask(fwd, "a.example.test").rcode() == dns.rcode.NOERROR
        denied = ask(fwd, "leak-secret.a.example.test")
    assert denied.rcode() == dns.rcode.NXDOMAIN  # never REFUSED
    assert [q[0] for q in auth.queries] == ["a.example.test"]
    msg = [r.getMessage() for r in caplog.records if "denied" in r.getMessage()]
    assert msg and "leak-secret.a.example.test" in msg[0] and "default egress is deny" in msg[0]
    assert fwd.stats["denied"] == 1


def test_none_policy_blocks_all_dns(auth: AuthServer) -> None:
    fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, [auth.upstream])
    assert ask(fwd, "a.example.test").rcode() == dns.rcode.NXDOMAIN
    assert auth.queries == []


def test_deny_domain_suffix_wins(auth: AuthServer) -> None:
    policy = NetworkPolicy.allow_all().with_denied_domains(deny_domain_suffixes=[".example.test"])
    fwd = DnsForwarder(policy.evaluate_dns, [auth.upstream])
    assert ask(fwd, "a.example.test").rcode() == dns.rcode.NXDOMAIN


def test_policy_sees_transport(auth: AuthServer) -> None:
    calls: list[tuple[str, str, int]] = []

    def decider(qname: str, protocol: str = "udp", port: int = 53):
        calls.append((qname, protocol, port))
        return ALLOW_ALL.evaluate_dns(qname, protocol, port)

    fwd = DnsForwarder(decider, [auth.upstream])
    ask(fwd, "A.Example.Test.", protocol="tcp")
    assert calls == [("a.example.test", "tcp", 53)]
    assert auth.queries[-1][2] == "tcp"


def test_broken_decider_denies(auth: AuthServer) -> None:
    def decider(qname: str, protocol: str = "udp", port: int = 53):
        raise RuntimeError("boom")

    fwd = DnsForwarder(decider, [auth.upstream])
    assert ask(fwd, "a.example.test").rcode() == dns.rcode.NXDOMAIN


# -- CNAME chains and the pin-cache feed -----------------------------------------------
def test_cname_chain_reported_with_min_ttl(auth: AuthServer) -> None:
    seen: list[tuple[str, list[tuple[str, int]]]] = []
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream],
                       on_answer=lambda n, ips: seen.append((n, ips)))
    r = ask(fwd, "c1.example.test")
    assert [rr.rdtype for rr in r.answer].count(dns.rdatatype.CNAME) == 2
    assert seen == [("c1.example.test", [("93.184.216.34", 50)])]


def test_unrelated_records_are_not_reported() -> None:
    server = AuthServer(extra_answer="evil.example.test. 300 IN A 93.184.216.99")
    try:
        seen: list[tuple[str, list[tuple[str, int]]]] = []
        fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [server.upstream],
                           on_answer=lambda n, ips: seen.append((n, ips)))
        r = ask(fwd, "a.example.test")
        assert "93.184.216.99" in addresses(r)  # passed through to the guest ...
        assert seen == [("a.example.test", [("93.184.216.34", 300)])]  # ... but never pinned
    finally:
        server.close()


def test_aaaa_ttl_floor_and_ceiling(auth: AuthServer) -> None:
    seen: list[tuple[str, list[tuple[str, int]]]] = []
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream], ttl_ceiling=60,
                       on_answer=lambda n, ips: seen.append((n, ips)))
    assert addresses(ask(fwd, "v6.example.test", "AAAA")) == ["2606:4700::6810:84e5"]
    assert seen == [("v6.example.test", [("2606:4700::6810:84e5", 60)])]


def test_failing_callback_does_not_break_dns(auth: AuthServer) -> None:
    def cb(name: str, ips: list[tuple[str, int]]) -> None:
        raise ValueError("cache full")

    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream], on_answer=cb)
    assert addresses(ask(fwd, "a.example.test")) == ["93.184.216.34"]


# -- rebind protection ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["rebind.example.test", "loop.example.test",
                                  "mixed.example.test"])
def test_rebinding_answer_is_nxdomain(auth: AuthServer, name: str) -> None:
    seen: list[object] = []
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream],
                       on_answer=lambda n, ips: seen.append(n))
    assert ask(fwd, name).rcode() == dns.rcode.NXDOMAIN
    assert seen == [] and fwd.stats["rebind_blocked"] == 1


def test_address_only_allow_rule_exempts_private_answers(auth: AuthServer) -> None:
    private = NetworkPolicy.from_profiles("public", "private")
    fwd = DnsForwarder(private.evaluate_dns, [auth.upstream])
    assert addresses(ask(fwd, "rebind.example.test")) == ["10.0.0.5"]
    # the private profile never exempts loopback
    assert ask(fwd, "loop.example.test").rcode() == dns.rcode.NXDOMAIN
    # port-scoped rules do not exempt
    scoped = NetworkPolicy.custom(rules=[Rule.allow("10.0.0.0/8", protocol="tcp", port=80),
                                         Rule.allow("a.example.test"), Rule.allow("*")])
    fwd2 = DnsForwarder(scoped.evaluate_dns, [auth.upstream])
    assert ask(fwd2, "rebind.example.test").rcode() == dns.rcode.NXDOMAIN


def test_rebind_protection_can_be_disabled(auth: AuthServer) -> None:
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream], rebind_protection=False)
    assert addresses(ask(fwd, "loop.example.test")) == ["127.0.0.1"]


def test_rebind_set() -> None:
    for ip in ("0.1.2.3", "100.64.0.1", "169.254.169.254", "192.0.2.1", "198.18.0.1",
               "224.0.0.1", "255.255.255.255", "::", "fe80::1", "fd00::1", "2001:db8::1",
               "64:ff9b:1::1", "3fff::1", "::ffff:10.0.0.1"):
        assert is_rebind_address(ip), ip
    for ip in ("1.1.1.1", "93.184.216.34", "2606:4700::1", "::ffff:8.8.8.8", "64:ff9b::1"):
        assert not is_rebind_address(ip), ip


# -- host alias -----------------------------------------------------------------------
def test_host_alias_answered_locally(auth: AuthServer) -> None:
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream],
                       host_alias="host.microvm.internal",
                       gateway=["172.16.0.1", "fd42:6d73:62::1"])
    r = ask(fwd, "HOST.microvm.internal")
    assert addresses(r) == ["172.16.0.1"] and r.answer[0].ttl == 60
    assert addresses(ask(fwd, "host.microvm.internal", "AAAA")) == ["fd42:6d73:62::1"]
    mx = ask(fwd, "host.microvm.internal", "MX")
    assert mx.rcode() == dns.rcode.NOERROR and mx.answer == []
    assert auth.queries == []  # nothing forwarded, and not subject to rebind protection


def test_host_alias_still_obeys_policy(auth: AuthServer) -> None:
    fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, [auth.upstream],
                       host_alias="host.microvm.internal", gateway=["172.16.0.1"])
    assert ask(fwd, "host.microvm.internal").rcode() == dns.rcode.NXDOMAIN


# -- malformed queries ----------------------------------------------------------------
def test_formerr_and_drops(auth: AuthServer) -> None:
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream])
    q = dns.message.make_query("a.example.test", "A")
    q2 = dns.message.make_query("a.example.test", "A")
    q.question.append(q2.question[0].__class__(q2.question[0].name, q2.question[0].rdclass,
                                               dns.rdatatype.AAAA))
    two = dns.message.from_wire(asyncio.run(fwd.handle(q.to_wire())) or b"")
    assert two.rcode() == dns.rcode.FORMERR and two.id == q.id
    zero = asyncio.run(fwd.handle(b"\xbe\xef\x01\x00" + bytes(8)))
    assert zero is not None and zero[:2] == b"\xbe\xef" and zero[3] & 0xF == dns.rcode.FORMERR
    garbage = asyncio.run(fwd.handle(b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 30))
    assert garbage is not None and garbage[:2] == b"\x12\x34" and garbage[3] & 0xF == 1
    assert asyncio.run(fwd.handle(b"\x00\x01")) is None  # too short for a header
    resp = dns.message.make_response(dns.message.make_query("x.test", "A")).to_wire()
    assert asyncio.run(fwd.handle(resp)) is None  # responses are not answered
    assert auth.queries == []
    with pytest.raises(DnsForwarderError, match="protocol"):
        asyncio.run(fwd.handle(q.to_wire(), "sctp"))


# -- upstreams, failover ----------------------------------------------------------------
def test_failover_after_timeout(auth: AuthServer, blackhole: str) -> None:
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [blackhole, auth.upstream], timeout=0.5)
    assert addresses(ask(fwd, "a.example.test")) == ["93.184.216.34"]
    assert addresses(ask(fwd, "a.example.test", protocol="tcp")) == ["93.184.216.34"]
    assert fwd.stats["failovers"] == 2


def test_failover_after_connection_refused(auth: AuthServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [dead, auth.upstream], timeout=1)
    assert addresses(ask(fwd, "a.example.test")) == ["93.184.216.34"]


def test_all_upstreams_unusable_is_servfail(blackhole: str) -> None:
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [blackhole], timeout=0.3)
    assert ask(fwd, "a.example.test").rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("rcode", ["SERVFAIL", "REFUSED"])
def test_error_answers_are_returned_not_failed_over(auth: AuthServer, rcode: str) -> None:
    bad = AuthServer(rcode=rcode)
    try:
        fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [bad.upstream, auth.upstream])
        assert dns.rcode.to_text(ask(fwd, "a.example.test").rcode()) == rcode
        assert auth.queries == []
    finally:
        bad.close()


def test_upstream_nxdomain_passes_through(auth: AuthServer) -> None:
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream])
    assert ask(fwd, "nope.example.test").rcode() == dns.rcode.NXDOMAIN


def test_truncated_upstream_udp_is_retried_over_tcp() -> None:
    server = AuthServer(truncate_udp=True)
    try:
        fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [server.upstream])
        assert addresses(ask(fwd, "a.example.test")) == ["93.184.216.34"]
        assert [q[2] for q in server.queries] == ["udp", "tcp"]
    finally:
        server.close()


def test_upstream_configuration(tmp_path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# c\nsearch x\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\n"
                    "options rotate\n")
    assert resolv_conf_upstreams(conf) == [Upstream("10.0.0.53"), Upstream("fe80::1")]
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, resolv_conf=conf)
    assert fwd.upstreams[0] == Upstream("10.0.0.53", 53)
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(DnsForwarderError, match="no upstream"):
        DnsForwarder(ALLOW_ALL.evaluate_dns, resolv_conf=empty)
    assert resolv_conf_upstreams(empty) == []


@pytest.mark.parametrize("text", [
    "nameserver 10.0.0.53\nnameserver bogus\n",     # not an IP address
    "search " + "a" * 64 + "\nnameserver 10.0.0.53\n",  # not a domain name
    "nameserver https://dns.example/dns-query\n",   # a DoH URL: not for a forwarder
])
def test_bad_resolv_conf_is_a_typed_error_naming_the_file(tmp_path, text: str) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(text)
    with pytest.raises(DnsForwarderError, match=r"resolver configuration .*resolv\.conf"):
        resolv_conf_upstreams(conf)
    with pytest.raises(DnsForwarderError, match="pass upstreams="):
        DnsForwarder(ALLOW_ALL.evaluate_dns, resolv_conf=conf)
    # explicit upstreams never read the file
    assert DnsForwarder(ALLOW_ALL.evaluate_dns, ["10.0.0.1"], resolv_conf=conf).upstreams \
        == [Upstream("10.0.0.1")]


def test_undecodable_and_missing_resolv_conf(tmp_path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_bytes(b"nameserver 10.0.0.53\n\xff\xfe\n")
    with pytest.raises(DnsForwarderError, match="is not valid"):
        resolv_conf_upstreams(conf)
    with pytest.raises(DnsForwarderError, match=r"cannot read resolver configuration .*No such"):
        resolv_conf_upstreams(tmp_path / "missing")
    with pytest.raises(DnsForwarderError, match="cannot read resolver configuration"):
        resolv_conf_upstreams(tmp_path)   # a directory
    for bad in ("dns.example", "1.2.3.4:0", "1.2.3.4:99999", "[::1]:x", ""):
        with pytest.raises(DnsForwarderError):
            DnsForwarder(ALLOW_ALL.evaluate_dns, [bad])
    with pytest.raises(DnsForwarderError, match="timeout"):
        DnsForwarder(ALLOW_ALL.evaluate_dns, ["127.0.0.1"], timeout=0)
    with pytest.raises(DnsForwarderError, match="gateway"):
        DnsForwarder(ALLOW_ALL.evaluate_dns, ["127.0.0.1"], host_alias="h.internal")
    assert Upstream.parse(("::1", 5353)) == Upstream("::1", 5353)


# -- truncation -------------------------------------------------------------------------
def test_large_udp_answer_becomes_header_only_tc(auth: AuthServer) -> None:
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream])
    q = dns.message.make_query("big.example.test", "A")  # no EDNS: 512 bytes
    wire = asyncio.run(fwd.handle(q.to_wire(), "udp"))
    assert wire is not None and len(wire) == 12
    r = dns.message.from_wire(wire)
    assert r.flags & dns.flags.TC and r.id == q.id and r.answer == []
    # a client with a big enough EDNS buffer gets everything over UDP
    big = ask(fwd, "big.example.test", use_edns=0, payload=4096)
    assert len(addresses(big)) == 60 and not big.flags & dns.flags.TC
    # and over TCP there is no limit
    assert len(addresses(ask(fwd, "big.example.test", protocol="tcp"))) == 60
    assert fwd.stats["truncated"] == 1


# -- listener mode with real clients ---------------------------------------------------------
class Listener:
    def __init__(self, fwd: DnsForwarder) -> None:
        self.thread = ForwarderThread(fwd)
        self.host, self.port = self.thread.start_listener("127.0.0.1", 0)

    def close(self) -> None:
        self.thread.close()


@pytest.fixture
def listener(auth: AuthServer) -> Iterator[Listener]:
    policy = NetworkPolicy.custom(rules=[Rule.allow(".example.test"),
                                         Rule.allow("host.microvm.internal")])
    fwd = DnsForwarder(policy.evaluate_dns, [auth.upstream], host_alias="host.microvm.internal",
                       gateway=["172.16.0.1"])
    lst = Listener(fwd)
    try:
        yield lst
    finally:
        lst.close()


def dig(listener: Listener, *args: str) -> str:
    require_binaries("dig")
    out = subprocess.run(["dig", f"@{listener.host}", "-p", str(listener.port), "+time=5",
                          "+tries=1", *args], capture_output=True, text=True, timeout=30)
    return out.stdout


def test_dig_udp_tcp_and_truncation_fallback(listener: Listener) -> None:
    out = dig(listener, "a.example.test", "A")
    assert "status: NOERROR" in out and "93.184.216.34" in out
    out = dig(listener, "+tcp", "c1.example.test", "A")
    assert "c2.example.test" in out and "93.184.216.34" in out
    out = dig(listener, "+noedns", "+ignore", "big.example.test", "A")
    assert " tc " in out.split("flags:")[1].split(";")[0] + " "
    out = dig(listener, "+noedns", "big.example.test", "A")  # dig retries over TCP
    assert "Truncated, retrying in TCP mode" in out and out.count("IN\tA\t93.184.") == 60
    out = dig(listener, "host.microvm.internal", "A")
    assert "172.16.0.1" in out and "60\tIN\tA" in out
    out = dig(listener, "rebind.example.test", "A")
    assert "status: NXDOMAIN" in out


def test_dnspython_client_over_listener(listener: Listener) -> None:
    q = dns.message.make_query("v6.example.test", "AAAA")
    r = dns.query.udp(q, listener.host, port=listener.port, timeout=5)
    assert addresses(r) == ["2606:4700::6810:84e5"] and r.id == q.id
    r = dns.query.tcp(dns.message.make_query("a.example.test", "A"), listener.host,
                      port=listener.port, timeout=5)
    assert addresses(r) == ["93.184.216.34"]


def test_non_in_class_address_records_are_ignored() -> None:
    """Regression (found by fuzz_dns_forwarder): an A record of class 2 parses as opaque
    rdata without an address; the rebind check and the pin feed must skip it."""
    seen: list[object] = []
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, ["192.0.2.1"],
                       on_answer=lambda n, ips: seen.append((n, ips)))
    wire = bytes.fromhex("0b0180000001000100000000"  # id, QR, 1 question, 1 answer
                         "017800" "0001" "0002"       # x. A class 2 (CSNET)
                         "c00c" "0001" "0002" "0000003c" "0004" "7f000001")
    msg = dns.message.from_wire(wire)
    assert fwd._rebind_violation(msg) is None
    fwd._report("x", msg.question[0].name, msg)
    assert seen == []


# -- guest-chosen resolvers (dst) ---------------------------------------------------------
def ask_dst(fwd: DnsForwarder, name: str, dst: object, protocol: str = "udp"
            ) -> dns.message.Message:
    q = dns.message.make_query(name, "A")
    wire = asyncio.run(fwd.handle(q.to_wire(), protocol, dst))  # type: ignore[arg-type]
    assert wire is not None
    return dns.message.from_wire(wire)


def test_query_to_gateway_uses_configured_upstreams(auth: AuthServer) -> None:
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream], gateway=["172.16.0.1"])
    assert addresses(ask_dst(fwd, "a.example.test", "172.16.0.1")) == ["93.184.216.34"]
    assert addresses(ask_dst(fwd, "a.example.test", ("172.16.0.1", 53))) == ["93.184.216.34"]


def test_guest_chosen_resolver_allowed_goes_there_without_failover(
        auth: AuthServer, blackhole: str) -> None:
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [blackhole], timeout=0.3)
    r = ask_dst(fwd, "a.example.test", ("127.0.0.1", auth.port), "tcp")
    assert addresses(r) == ["93.184.216.34"] and auth.queries[-1][2] == "tcp"
    host, port = blackhole.rsplit(":", 1)
    fwd2 = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream], timeout=0.3)
    assert ask_dst(fwd2, "a.example.test", (host, int(port))).rcode() == dns.rcode.SERVFAIL
    assert len(auth.queries) == 1  # no failover to the configured upstream


def test_guest_chosen_resolver_denied_by_egress_policy(
        auth: AuthServer, caplog: pytest.LogCaptureFixture) -> None:
    policy = NetworkPolicy.custom(rules=[Rule.allow("a.example.test")])  # no egress to 127/8
    fwd = DnsForwarder(policy.evaluate_dns, [auth.upstream])
    with caplog.at_level(logging.INFO, logger="netstack.dns"):
        r = ask_dst(fwd, "a.example.test", ("127.0.0.1", auth.port))
    assert r.rcode() == dns.rcode.NXDOMAIN and auth.queries == []
    assert any("to resolver 127.0.0.1" in rec.getMessage() for rec in caplog.records)
    # a bare callable has no egress policy: guest-chosen resolvers are denied
    bare = DnsForwarder(lambda q, p="udp", port=53: ALLOW_ALL.evaluate_dns(q, p, port),
                        [auth.upstream])
    assert ask_dst(bare, "a.example.test", ("127.0.0.1", auth.port)).rcode() == \
        dns.rcode.NXDOMAIN
    # an explicit egress decider
    calls: list[tuple[str, str, int]] = []

    def egress(ip: str, proto: str, port: int) -> Decision:
        calls.append((ip, proto, port))
        return Decision("allow", None, "test")

    custom = DnsForwarder(lambda q, p="udp", port=53: ALLOW_ALL.evaluate_dns(q, p, port),
                          [auth.upstream], egress_decider=egress)
    assert addresses(ask_dst(custom, "a.example.test", ("127.0.0.1", auth.port))) == \
        ["93.184.216.34"]
    assert calls == [("127.0.0.1", "udp", auth.port)]


def test_forwarder_thread_submit_from_threads(auth: AuthServer) -> None:
    import concurrent.futures

    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream])
    with ForwarderThread(fwd) as t:
        queries = [dns.message.make_query("a.example.test", "A") for _ in range(20)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda q: t.submit(q.to_wire()).result(10), queries))
    for q, wire in zip(queries, replies, strict=True):
        assert wire is not None
        r = dns.message.from_wire(wire)
        assert r.id == q.id and addresses(r) == ["93.184.216.34"]
    with pytest.raises(DnsForwarderError, match="closed"):
        t.submit(queries[0].to_wire())


def test_inactive_family_gets_empty_noerror(auth: AuthServer) -> None:
    from netstack.gateway import AddressPlan

    fwd = DnsForwarder.for_plan(ALLOW_ALL, AddressPlan(0), upstreams=[auth.upstream])
    r = ask(fwd, "v6.example.test", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == [] and auth.queries == []
    assert addresses(ask(fwd, "a.example.test")) == ["93.184.216.34"]
    v6 = DnsForwarder.for_plan(ALLOW_ALL, AddressPlan(0, ipv6=True), upstreams=[auth.upstream])
    assert addresses(ask(v6, "v6.example.test", "AAAA")) == ["2606:4700::6810:84e5"]
    assert addresses(ask(v6, "host.microvm.internal", "AAAA")) == ["fd42:6d73:62::1"]
    with pytest.raises(DnsForwarderError, match="inactive_families"):
        DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream], inactive_families=["ipv5"])


def test_answers_feed_the_c_pin_cache(auth: AuthServer) -> None:
    """on_answer wired to the fast path's PinCache: CNAME chains pin the queried name."""
    from netstack import PinCache
    from netstack.gateway import pin_cache_callback

    pins = PinCache(1024)
    fwd = DnsForwarder(ALLOW_ALL.evaluate_dns, [auth.upstream],
                       on_answer=pin_cache_callback(pins))
    ask(fwd, "c1.example.test")
    ask(fwd, "v6.example.test", "AAAA")
    assert pins.names("93.184.216.34") == frozenset({"c1.example.test"})
    assert pins.names("2606:4700::6810:84e5") == frozenset({"v6.example.test"})
    ask(fwd, "rebind.example.test")  # blocked answers are never pinned
    assert pins.names("10.0.0.5") == frozenset()
