"""DNS response parser and pin cache semantics (reference microsandbox §2.3)."""

from __future__ import annotations

import struct

import dns.message
import dns.rcode
import dns.rrset
import pytest

from netstack import FastPathError, MalformedDNS, PinCache, parse_dns_response
from tests.netstack_fastpath._dns import build_response


def dnspython_response(qname: str, qtype: str, records: list[tuple[str, int, str, str]],
                       rcode: int = 0) -> bytes:
    """records: (owner, ttl, type, value); dnspython compresses names."""
    q = dns.message.make_query(qname, qtype)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for owner, ttl, rtype, value in records:
        r.answer.append(dns.rrset.from_text(owner, ttl, "IN", rtype, value))
    return r.to_wire()


def test_cname_chain_with_compression() -> None:
    wire = dnspython_response("www.example.com", "A", [
        ("www.example.com.", 300, "CNAME", "a.cdn.example.net."),
        ("a.cdn.example.net.", 60, "CNAME", "b.cdn.example.net."),
        ("b.cdn.example.net.", 30, "A", "192.0.2.10"),
        ("b.cdn.example.net.", 30, "A", "192.0.2.11"),
        ("unrelated.example.org.", 1, "A", "203.0.113.66"),
    ])
    r = parse_dns_response(wire)
    assert r.qname == "www.example.com" and r.is_response and r.rcode == 0
    assert r.chain == ("a.cdn.example.net", "b.cdn.example.net")
    assert [str(a) for a, _ in r.addresses] == ["192.0.2.10", "192.0.2.11"]
    assert r.ttl == 30


def test_aaaa_and_mixed_case() -> None:
    wire = dnspython_response("Host.Example.COM", "AAAA", [
        ("host.example.com.", 120, "AAAA", "2001:db8::10")])
    r = parse_dns_response(wire)
    assert r.qname == "host.example.com" and str(r.addresses[0][0]) == "2001:db8::10"


def test_compression_loops_and_forward_pointers_are_malformed() -> None:
    head = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0)
    loop = head + b"\xc0\x0c" + b"\x00\x01\x00\x01"          # points at itself
    forward = head + b"\xc0\x20" + b"\x00\x01\x00\x01" + bytes(20)
    for bad in (loop, forward, head, head[:5], head + b"\x40abc\x00\x00\x01\x00\x01"):
        with pytest.raises(MalformedDNS):
            parse_dns_response(bad)
    # a CNAME chain that loops back is cut, not followed forever
    wire = dnspython_response("a.test", "A", [("a.test.", 5, "CNAME", "b.test."),
                                              ("b.test.", 5, "CNAME", "a.test."),
                                              ("b.test.", 5, "A", "192.0.2.1")])
    assert [str(a) for a, _ in parse_dns_response(wire).addresses] == ["192.0.2.1"]


def test_truncation_at_every_byte_never_crashes() -> None:
    wire = dnspython_response("www.example.com", "A", [
        ("www.example.com.", 300, "CNAME", "cdn.example.net."),
        ("cdn.example.net.", 30, "A", "192.0.2.10")])
    for cut in range(len(wire)):
        try:
            parse_dns_response(wire[:cut])
        except MalformedDNS:
            pass


def test_pin_ttl_floor_ceiling_and_expiry() -> None:
    pins = PinCache(ttl_ceiling=100)
    assert pins.learn(build_response("a.test", [("a", "192.0.2.1", 0)]), now=0.0) == 1
    assert pins.names("192.0.2.1", now=0.99) == {"a.test"}      # floored to 1 s
    assert pins.names("192.0.2.1", now=1.0) == frozenset()      # expires_at > now
    pins.learn(build_response("b.test", [("a", "192.0.2.2", 86400)]), now=0.0)
    assert pins.names("192.0.2.2", now=99.0) == {"b.test"}
    assert pins.names("192.0.2.2", now=100.5) == frozenset()    # capped at 100 s


def test_new_answer_replaces_and_errors_clear() -> None:
    pins = PinCache()
    pins.learn(build_response("a.test", [("a", "192.0.2.1", 60), ("a", "192.0.2.2", 60)]), now=0)
    assert pins.names("192.0.2.2", now=1) == {"a.test"}
    pins.learn(build_response("a.test", [("a", "192.0.2.3", 60)]), now=1)
    assert pins.names("192.0.2.2", now=2) == frozenset()
    assert pins.names("192.0.2.3", now=2) == {"a.test"}
    # AAAA refreshes independently
    pins.learn(build_response("a.test", [("aaaa", "2001:db8::3", 60)], qtype="aaaa"), now=2)
    assert pins.names("192.0.2.3", now=3) == {"a.test"}
    pins.learn(build_response("a.test", [], rcode=3), now=3)        # NXDOMAIN clears A
    assert pins.names("192.0.2.3", now=4) == frozenset()
    assert pins.names("2001:db8::3", now=4) == {"a.test"}
    pins.learn(build_response("a.test", [], qtype="aaaa"), now=4)   # NODATA clears AAAA
    assert pins.names("2001:db8::3", now=5) == frozenset()
    assert len(pins) == 0


def test_shared_ip_many_names_and_unrelated_records_ignored() -> None:
    pins = PinCache()
    for name in ("x.test", "y.test", "z.test"):
        pins.learn(build_response(name, [("a", "198.51.100.1", 60)]), now=0)
    assert pins.names("198.51.100.1", now=1) == {"x.test", "y.test", "z.test"}
    stray = build_response("w.test", [("a", "198.51.100.9", 60)], owner="other.test")
    assert pins.learn(stray, now=0) == 0
    assert pins.names("198.51.100.9", now=1) == frozenset()


def test_truncated_and_query_messages_are_ignored() -> None:
    pins = PinCache()
    wire = bytearray(build_response("t.test", [("a", "192.0.2.1", 60)]))
    wire[2] |= 0x02  # TC
    assert pins.learn(bytes(wire), now=0) == 0
    q = dns.message.make_query("t.test", "A").to_wire()
    assert pins.learn(q, now=0) == 0
    with pytest.raises(MalformedDNS):
        pins.learn(b"\x00" * 5)


def test_size_bound_and_eviction_rule() -> None:
    pins = PinCache(max_bindings=100)
    for i in range(1000):
        pins.pin(f"n{i}.test", [f"10.0.{i // 250}.{i % 250}"], ttl=10 + i, now=0.0)
    assert len(pins) <= 100 and pins.evictions == 900
    # the newest (longest-lived) names survive, the soonest-expiring are evicted
    assert pins.names("10.0.3.249", now=1) == {"n999.test"}
    assert pins.names("10.0.0.0", now=1) == frozenset()


def test_bad_arguments() -> None:
    with pytest.raises(FastPathError, match="max_bindings"):
        PinCache(max_bindings=0)
    with pytest.raises(FastPathError, match="ttl_ceiling"):
        PinCache(ttl_ceiling=0.5)
    with pytest.raises(Exception, match="not an IPv4 or IPv6"):
        PinCache().pin("a.test", ["not-an-ip"], ttl=1)
