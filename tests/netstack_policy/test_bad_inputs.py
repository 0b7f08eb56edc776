"""Every bad policy input raises ``PolicyError`` with one line naming the bad value.

One table: the rule builders, ``NetworkPolicy.custom``, ``from_dict``, ``coerce`` (in
each form it accepts), presets and profiles - the inputs the README's netstack section
calls errors, plus rules that could never do what they say (ICMP with ports, inbound
ICMP) and ambiguous ones (``port`` with ``ports``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from netstack import Destination, NetworkPolicy, PolicyError, Rule

ICMP_PORTS = {"action": "allow", "protocol": "icmpv4", "port": 80}
ICMP_INGRESS = {"action": "allow", "protocols": ["icmpv6"], "direction": "ingress"}
ICMP_ANY = {"action": "deny", "protocols": ["tcp", "icmpv4"], "direction": "any"}
WIRE_ICMP_PORTS = {"direction": "egress", "destination": "any", "protocols": ["icmpv4"],
                   "ports": [{"start": 1, "end": 2}], "action": "allow"}

CASES: list[tuple[str, Callable[[], Any], tuple[str, ...]]] = [
    # port / ports, protocol / protocols: one or the other
    ("port and ports", lambda: Rule.allow(port=443, ports="80"), ("port=443", "ports='80'")),
    ("protocol and protocols", lambda: Rule.deny(protocol="tcp", protocols=["udp"]),
     ("protocol='tcp'", "protocols=['udp']")),
    ("dict port and ports", lambda: Rule.from_dict({"action": "allow", "port": 1, "ports": [2]}),
     ("port=1",)),
    # rules that can never match
    ("icmp with a port", lambda: Rule.allow(protocol="icmpv4", port=80),
     ("icmpv4", "ports 80", "ICMP has no ports")),
    ("icmp among protocols with ports", lambda: Rule.allow(protocols=["tcp", "icmpv6"],
                                                           ports="1-5"),
     ("icmpv6", "ports 1-5")),
    ("icmp ingress", lambda: Rule.allow(protocol="icmpv4", direction="ingress"),
     ("icmpv4", "'ingress'", "egress-only")),
    ("icmp any direction", lambda: Rule.deny(protocol="icmpv6", direction="any"),
     ("icmpv6", "'any'", "egress-only")),
    ("icmp direct construction",
     lambda: Rule("allow", "ingress", Destination.any(), frozenset({"icmpv4"})),
     ("icmpv4", "'ingress'")),
    ("icmp from_dict", lambda: Rule.from_dict(ICMP_PORTS), ("icmpv4", "ports 80")),
    ("icmp policy from_dict", lambda: NetworkPolicy.from_dict({"rules": [WIRE_ICMP_PORTS]}),
     ("rules[0]", "icmpv4", "ports 1-2")),
    ("icmp custom dict", lambda: NetworkPolicy.custom(rules=[Rule.allow(), ICMP_INGRESS]),
     ("rules[1]", "icmpv6", "'ingress'")),
    ("icmp coerce custom", lambda: NetworkPolicy.coerce({"rules": [ICMP_ANY]}),
     ("rules[0]", "icmpv4", "'any'")),
    ("icmp coerce wire", lambda: NetworkPolicy.coerce({"default_egress": "deny",
                                                        "default_ingress": "allow",
                                                        "rules": [WIRE_ICMP_PORTS]}),
     ("rules[0]", "icmpv4", "ports 1-2")),
    ("icmp coerce with defaults only", lambda: NetworkPolicy.coerce(
        {"default_egress": "allow", "rules": [ICMP_INGRESS], "deny_domains": ["x.test"]}),
     ("rules[0]", "'ingress'")),
    # rules lists
    ("rules of strings", lambda: NetworkPolicy.custom(rules=["x"]),  # type: ignore[list-item]
     ("rules[0]", "'x'")),
    ("rules of ints", lambda: NetworkPolicy.custom(rules=[Rule.allow(), 5]),  # type: ignore[list-item]
     ("rules[1]", "5")),
    ("rules not a list", lambda: NetworkPolicy.custom(rules=5), ("rules", "5")),  # type: ignore[arg-type]
    ("rules a string", lambda: NetworkPolicy.custom(rules="abc"), ("'abc'",)),  # type: ignore[arg-type]
    ("rules a single rule", lambda: NetworkPolicy.custom(rules=Rule.allow()),  # type: ignore[arg-type]
     ("single rule",)),
    ("coerce rules of ints", lambda: NetworkPolicy.coerce({"rules": [5]}), ("rules[0]", "5")),
    ("from_dict rules of strings", lambda: NetworkPolicy.from_dict({"rules": ["x"]}),
     ("rules[0]", "'x'")),
    ("bad rule inside a list", lambda: NetworkPolicy.custom(
        rules=[{"action": "allow"}, {"action": "allow", "port": "abc"}]),
     ("rules[1]", "'abc'")),
    # ports
    ("port not a number", lambda: Rule.allow(port="abc"), ("'abc'",)),
    ("port zero", lambda: Rule.allow(port=0), ("port 0",)),
    ("port too big", lambda: Rule.allow(port=70000), ("70000",)),
    ("range out of range", lambda: Rule.allow(port="1-70000"), ("70000", "'1-70000'")),
    ("range inverted", lambda: Rule.allow(ports="9000-8000"), ("'9000-8000'", "inverted")),
    ("port a bool", lambda: Rule.allow(port=True), ("True",)),
    ("wire range inverted", lambda: Rule.from_dict({"action": "deny",
                                                     "ports": [{"start": 9, "end": 1}]}),
     ("(9, 1)",)),
    # protocol, direction, action, defaults
    ("unknown protocol", lambda: Rule.allow(protocol="sctp"), ("'sctp'",)),
    ("unknown direction", lambda: Rule.allow(direction="outbound"), ("'outbound'",)),
    ("unknown action", lambda: Rule.build("permit"), ("'permit'",)),
    ("rule without action", lambda: Rule.from_dict({"destination": "any"}), ("no action",)),
    ("unknown rule key", lambda: Rule.from_dict({"action": "allow", "prot": "tcp"}),
     ("'prot'",)),
    ("unknown default", lambda: NetworkPolicy.custom(default_egress="maybe"), ("'maybe'",)),
    ("unknown wire default", lambda: NetworkPolicy.from_dict({"default_ingress": "open"}),
     ("'open'",)),
    # destinations
    ("unknown group", lambda: Rule.allow(destination={"group": "intranet"}), ("'intranet'",)),
    ("cidr host bits", lambda: Rule.allow(destination="10.0.0.1/8"), ("'10.0.0.1/8'",)),
    ("bad cidr", lambda: Rule.allow(destination="example.com/path"), ("'example.com/path'",)),
    ("domain with scheme", lambda: Rule.allow(destination="http://example.com"),
     ("'http://example.com'", "scheme")),
    ("domain with port", lambda: Rule.allow(destination="example.com:443"),
     ("'example.com:443'", "port")),
    ("domain with wildcard", lambda: Destination.domain("a.*.com"), ("'a.*.com'", "wildcard")),
    ("domain empty label", lambda: Rule.allow(destination="a..com"), ("'a..com'", "empty label")),
    ("suffix with nothing", lambda: Rule.allow(destination="*."), ("'*.'",)),
    ("unknown destination kind", lambda: NetworkPolicy.from_dict(
        {"rules": [{"action": "allow", "destination": {"fqdn": "x"}}]}),
     ("rules[0]", "'fqdn'")),
    ("destination not a string", lambda: Rule.allow(destination=42), ("42",)),  # type: ignore[arg-type]
    # presets, profiles, coerce forms
    ("unknown preset", lambda: NetworkPolicy.preset("intranet"), ("'intranet'",)),
    ("coerce unknown preset", lambda: NetworkPolicy.coerce("intranet"), ("'intranet'",)),
    ("coerce preset dict unknown", lambda: NetworkPolicy.coerce({"preset": "wide"}), ("'wide'",)),
    ("preset with rules", lambda: NetworkPolicy.coerce({"preset": "none", "rules": []}),
     ("rules",)),
    ("unknown profile", lambda: NetworkPolicy.from_profiles("all"), ("'all'",)),
    ("coerce unknown key", lambda: NetworkPolicy.coerce({"rulez": []}), ("'rulez'",)),
    ("coerce wrong type", lambda: NetworkPolicy.coerce(5), ("int",)),  # type: ignore[arg-type]
    ("deny list a string", lambda: NetworkPolicy.coerce({"deny_domains": "x.test"}),
     ("'x.test'",)),
    ("deny list of ints", lambda: NetworkPolicy.custom(deny_domains=[5]), ("5",)),  # type: ignore[list-item]
    ("deny list bad domain", lambda: NetworkPolicy.coerce({"deny_domain_suffixes":
                                                           ["http://x.test"]}),
     ("'http://x.test'",)),
    ("wire unknown key", lambda: NetworkPolicy.from_dict({"rulez": []}), ("'rulez'",)),
    ("wire rules not a list", lambda: NetworkPolicy.from_dict({"rules": "x"}), ("str",)),
]


@pytest.mark.parametrize(("make", "needles"), [(m, n) for _, m, n in CASES],
                         ids=[name for name, _, _ in CASES])
def test_bad_policy_input(make: Callable[[], Any], needles: tuple[str, ...]) -> None:
    with pytest.raises(PolicyError) as info:
        make()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_icmp_rules_that_can_match_still_build() -> None:
    # egress ICMP without ports, and port filters without a protocol (they skip ICMP)
    p = NetworkPolicy.custom(rules=[
        Rule.allow(protocols=["icmpv4", "icmpv6"], destination="public"),
        Rule.deny(direction="any", destination="10.0.0.0/8", ports="8000-9000"),
        {"action": "allow", "protocol": "icmpv4", "direction": "egress"},
    ])
    assert [r.describe() for r in p.rules] == [
        "allow egress group public icmpv4,icmpv6",
        "deny any cidr 10.0.0.0/8 ports 8000-9000",
        "allow egress any icmpv4",
    ]
    assert NetworkPolicy.from_dict(p.to_dict()) == p
    assert NetworkPolicy.coerce(p.to_dict()) == p


@pytest.mark.parametrize("name", ["public_only", "non_local", "none", "allow_all"])
def test_presets_still_build(name: str) -> None:
    p = NetworkPolicy.preset(name)
    assert NetworkPolicy.from_dict(p.to_dict()) == p
    assert NetworkPolicy.from_profiles("public", "private", "host").rules
