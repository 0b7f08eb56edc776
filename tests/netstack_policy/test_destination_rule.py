"""Destinations, shorthand classification and rule validation (reference §1.5-1.6)."""

from __future__ import annotations

from typing import Any

import pytest

from netstack import Destination, PolicyError, Rule, parse_port_range


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        (None, "any", None),
        ("*", "any", None),
        ("any", "any", None),
        ("domain=Example.COM", "domain", "example.com"),
        ("suffix=.corp.example", "domain_suffix", "corp.example"),
        ("public", "group", "public"),
        ("loopback", "group", "loopback"),
        ("private", "group", "private"),
        ("link-local", "group", "link_local"),
        ("link_local", "group", "link_local"),
        ("metadata", "group", "metadata"),
        ("multicast", "group", "multicast"),
        ("host", "group", "host"),
        (".internal", "domain_suffix", "internal"),
        ("*.example.com", "domain_suffix", "example.com"),
        ("10.0.0.0/8", "cidr", "10.0.0.0/8"),
        ("2001:db8::/32", "cidr", "2001:db8::/32"),
        ("1.1.1.1", "cidr", "1.1.1.1/32"),
        ("2001:db8::1", "cidr", "2001:db8::1/128"),
        ("localhost", "domain", "localhost"),
        ("api.example.com.", "domain", "api.example.com"),
        ("_srv._tcp.example.com", "domain", "_srv._tcp.example.com"),
        ("bücher.example", "domain", "xn--bcher-kva.example"),
    ],
)
def test_shorthand(text: str | None, kind: str, value: str | None) -> None:
    d = Destination.parse(text)
    assert (d.kind, d.value) == (kind, value)


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("https://example.com", "URL scheme"),
        ("example.com:443", "port"),
        ("example.com/path", "not a valid CIDR"),
        ("a..b", "empty label"),
        ("", "empty string"),
        ("   ", "empty string"),
        ("exa mple.com", "invalid label"),
        ("-bad.example", "invalid label"),
        ("x" * 64 + ".example", "longer than 63"),
        (("a." * 127) + "com", "longer than 253"),
        ("*", None),
        ("domain=", "is empty"),
        ("suffix=.", "is empty"),
        ("*.", "is empty"),
        ("10.0.0.1/8", "host bits set"),
        ("ex*ample.com", "wildcard"),
    ],
)
def test_shorthand_errors(text: str, msg: str | None) -> None:
    if msg is None:
        Destination.parse(text)
        return
    with pytest.raises(PolicyError, match=msg):
        Destination.parse(text)


def test_explicit_constructors() -> None:
    assert Destination.any().to_dict() == "any"
    assert Destination.ip("::ffff:10.1.1.1").value == "10.1.1.1/32"
    assert Destination.group("LINK-LOCAL").value == "link_local"
    with pytest.raises(PolicyError, match="unknown destination group 'lan'"):
        Destination.group("lan")
    with pytest.raises(PolicyError, match="not an IPv4 or IPv6"):
        Destination.ip("10.0.0.0/8")
    with pytest.raises(PolicyError, match="contains a port"):
        Destination.domain("example.com:80")


@pytest.mark.parametrize(
    "wire",
    [
        "any",
        {"cidr": "10.0.0.0/8"},
        {"domain": "example.com"},
        {"domain_suffix": "example.com"},
        {"group": "link_local"},
    ],
)
def test_destination_wire_roundtrip(wire: Any) -> None:
    assert Destination.from_dict(wire).to_dict() == wire


@pytest.mark.parametrize(
    ("wire", "msg"),
    [
        ({"cidr": "10.0.0.0/8", "domain": "x"}, "exactly one key"),
        ({"subnet": "10.0.0.0/8"}, "unknown destination kind"),
        ({"destination_kind": "net", "destination": "x"}, "unknown destination_kind"),
        ({"destination_kind": "cidr"}, "needs a value"),
        ({"destination_kind": "any", "destination": "10.0.0.0/8"}, "takes no value"),
        (42, "expected 'any' or a one-key dict"),
    ],
)
def test_destination_wire_errors(wire: Any, msg: str) -> None:
    with pytest.raises(PolicyError, match=msg):
        Destination.from_dict(wire)


def test_seed_destination_hash() -> None:
    for kind, value, want in [
        ("any", None, "any"),
        ("ip", "10.1.2.3", {"cidr": "10.1.2.3/32"}),
        ("cidr", "10.0.0.0/8", {"cidr": "10.0.0.0/8"}),
        ("domain", "Example.com", {"domain": "example.com"}),
        ("domain_suffix", ".example.com", {"domain_suffix": "example.com"}),
        ("group", "link-local", {"group": "link_local"}),
    ]:
        d = Destination.coerce({"destination_kind": kind, "destination": value})
        assert d.to_dict() == want


# -- ports ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "want"),
    [(443, (443, 443)), ("443", (443, 443)), (" 80 ", (80, 80)), ("8000-9000", (8000, 9000)),
     ("1-65535", (1, 65535)), ((5, 6), (5, 6)), ("22-22", (22, 22))],
)
def test_port_ok(spec: Any, want: tuple[int, int]) -> None:
    assert parse_port_range(spec) == want


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        (0, "out of range"),
        (65536, "out of range"),
        (-1, "out of range"),
        ("0", "out of range"),
        ("70000", "out of range"),
        ("90-80", "inverted"),
        ("80-", "invalid port"),
        ("-80", "invalid port"),
        ("1-2-3", "invalid port"),
        ("http", "invalid port"),
        ("", "invalid port"),
        ("8O", "invalid port"),
        ("0-100", "out of range"),
        ("100-70000", "out of range"),
        (True, "invalid port"),
        (1.5, "invalid port"),
        ((1,), "expected \\(start, end\\)"),
    ],
)
def test_port_errors(spec: Any, msg: str) -> None:
    with pytest.raises(PolicyError, match=msg):
        parse_port_range(spec)


def test_bad_range_never_widens() -> None:
    # The upstream Python SDK turned "abc" into "any port"; we refuse it.
    with pytest.raises(PolicyError):
        Rule.allow(destination="10.0.0.0/8", port="abc")


# -- rules ---------------------------------------------------------------------------


def test_rule_factories() -> None:
    r = Rule.allow(destination="1.1.1.1", protocol="tcp", port="443")
    assert r.action == "allow" and r.direction == "egress"
    assert r.destination == Destination.cidr("1.1.1.1/32")
    assert r.protocols == frozenset({"tcp"}) and r.ports == ((443, 443),)
    r2 = Rule.deny(direction="ingress", destination="10.0.0.0/8", ports=["8000-9000", 22],
                   protocols=["TCP", "udp"])
    assert r2.ports == ((22, 22), (8000, 9000))
    assert r2.protocols == frozenset({"tcp", "udp"})
    assert Rule.allow().destination.kind == "any"
    merged = Rule.allow(ports=["80", "81", "82-90", 79])
    assert merged.ports == ((79, 90),)
    with pytest.raises(PolicyError, match=r"give port or ports, not both \(got port=79"):
        Rule.allow(ports=["80"], port=79)


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"direction": "outbound"}, "direction must be one of egress, ingress, any"),
        ({"protocol": "icmp"}, "unknown protocol 'icmp'"),
        ({"protocols": ["tcp", "sctp"]}, "unknown protocol 'sctp'"),
        ({"destination": "http://x.com"}, "URL scheme"),
        ({"destination": 42}, "invalid rule destination"),
        ({"port": "1-0"}, "out of range"),
    ],
)
def test_rule_errors(kwargs: dict[str, Any], msg: str) -> None:
    with pytest.raises(PolicyError, match=msg):
        Rule.allow(**kwargs)


def test_rule_build_bad_action() -> None:
    with pytest.raises(PolicyError, match="action must be 'allow' or 'deny'"):
        Rule.build("permit")


def test_rule_from_seed_hash() -> None:
    # the seed's hand-written hash with singular protocol/port must not be widened
    r = Rule.from_dict({"action": "allow", "destination": "api.example.com", "protocol": "tcp",
                        "port": "443"})
    assert r.protocols == frozenset({"tcp"}) and r.ports == ((443, 443),)
    r2 = Rule.from_dict({"action": "deny", "direction": "any", "destination_kind": "group",
                         "destination": "link-local", "protocols": ["udp"], "ports": ["1-1024"]})
    assert r2.destination == Destination.group("link_local") and r2.direction == "any"
    with pytest.raises(PolicyError, match="unknown rule keys \\['prot'\\]"):
        Rule.from_dict({"action": "allow", "prot": "tcp"})
    with pytest.raises(PolicyError, match="has no action"):
        Rule.from_dict({"destination": "any"})


def test_rule_wire_roundtrip() -> None:
    r = Rule.deny(direction="ingress", destination=".corp.example", protocols=["udp", "tcp"],
                  ports=["1-5", 9])
    assert Rule.from_dict(r.to_dict()) == r
    icmp = Rule.deny(destination=".corp.example", protocols=["icmpv6", "icmpv4"])
    assert Rule.from_dict(icmp.to_dict()) == icmp


def test_direct_construction_validates() -> None:
    with pytest.raises(PolicyError):
        Rule("maybe")  # type: ignore[arg-type]
    with pytest.raises(PolicyError):
        Rule("allow", ports=((9, 1),))
