"""Presets, profiles, custom/coerce forms, wire format and the reference evaluator."""

from __future__ import annotations

import json
from typing import Any

import pytest

from netstack import (
    PRESET_ALIASES,
    Destination,
    Flow,
    NetworkPolicy,
    PolicyError,
    Rule,
    allow_dns_rule,
)

GW = ("172.16.0.1", "fd42:6d73:62::1")


def egress(remote: str, port: int | None = 443, proto: str = "tcp", **kw: Any) -> Flow:
    return Flow("egress", proto, remote, port, gateway=GW, **kw)


def ingress(remote: str, port: int | None = 8080, proto: str = "tcp", **kw: Any) -> Flow:
    return Flow("ingress", proto, remote, port, gateway=GW, **kw)


# -- presets -------------------------------------------------------------------------


def test_preset_rule_lists() -> None:
    dns = allow_dns_rule()
    assert dns == Rule("allow", "egress", Destination.group("host"),
                       frozenset({"udp", "tcp"}), ((53, 53),))
    p = NetworkPolicy.public_only()
    assert (p.default_egress, p.default_ingress) == ("deny", "allow")
    assert p.rules == (dns, Rule.allow(Destination.group("public")))
    n = NetworkPolicy.non_local()
    assert n.rules == (dns, Rule.allow("public"), Rule.allow("private"))
    assert NetworkPolicy.none() == NetworkPolicy("deny", "deny", ())
    assert NetworkPolicy.allow_all() == NetworkPolicy("allow", "allow", ())
    assert NetworkPolicy.default() == p


@pytest.mark.parametrize(
    ("alias", "canon"),
    sorted(PRESET_ALIASES.items()),
)
def test_every_alias(alias: str, canon: str) -> None:
    want = getattr(NetworkPolicy, canon)()
    assert NetworkPolicy.preset(alias) == want
    assert NetworkPolicy.preset(alias.upper()) == want
    assert NetworkPolicy.coerce(alias) == want
    assert NetworkPolicy.coerce({"preset": alias}) == want


def test_alias_table_matches_seed() -> None:
    assert PRESET_ALIASES == {
        "none": "none", "disabled": "none", "disable": "none", "airgapped": "none",
        "public": "public_only", "public_only": "public_only", "public-only": "public_only",
        "default": "public_only",
        "all": "allow_all", "allow_all": "allow_all", "allow-all": "allow_all",
        "non_local": "non_local", "non-local": "non_local", "nonlocal": "non_local",
    }


def test_unknown_preset() -> None:
    with pytest.raises(PolicyError, match="unknown network preset 'lan'"):
        NetworkPolicy.preset("lan")
    with pytest.raises(PolicyError, match="unknown network preset"):
        NetworkPolicy.coerce({"preset": "nope"})


def test_default_policy_behaviour() -> None:
    p = NetworkPolicy.public_only()
    assert p.evaluate(egress("203.0.113.5")).action == "allow"
    assert p.evaluate(egress("10.0.0.1")).action == "deny"
    assert p.evaluate(egress("169.254.169.254", 80)).action == "deny"
    assert p.evaluate(egress("127.0.0.1")).action == "deny"
    assert p.evaluate(egress("172.16.0.1", 53, "udp")).rule_index == 0
    assert p.evaluate(egress("172.16.0.1", 80)).action == "deny"  # host not allowed
    assert p.evaluate(ingress("203.0.113.5")).action == "allow"
    assert p.evaluate(egress("0.0.0.0")).action == "deny"  # no group


def test_none_blocks_everything() -> None:
    p = NetworkPolicy.none()
    assert p.evaluate(egress("172.16.0.1", 53, "udp")).action == "deny"
    assert p.evaluate_dns("example.com").action == "deny"
    assert p.evaluate(ingress("203.0.113.1")).action == "deny"


def test_allow_all_includes_metadata() -> None:
    assert NetworkPolicy.allow_all().evaluate(egress("169.254.169.254", 80)).allowed


# -- profiles ------------------------------------------------------------------------


def test_from_profiles_canonical_order_and_dedup() -> None:
    p = NetworkPolicy.from_profiles("host", "public", "private", "public")
    assert [r.destination.value for r in p.rules] == ["host", "public", "private", "host"]
    assert p.rules[0] == allow_dns_rule()
    assert NetworkPolicy.from_profiles("public") == NetworkPolicy.public_only()
    empty = NetworkPolicy.from_profiles()
    assert empty == NetworkPolicy("deny", "allow", ())


def test_from_profiles_errors() -> None:
    with pytest.raises(PolicyError, match="unknown network profile 'lan'"):
        NetworkPolicy.from_profiles("lan")
    with pytest.raises(PolicyError, match=r"NetworkPolicy\.preset"):
        NetworkPolicy.from_profiles("public", "all")


def test_host_profile_reaches_gateway() -> None:
    p = NetworkPolicy.from_profiles("public", "host")
    assert p.evaluate(egress("172.16.0.1", 8080)).allowed
    assert not p.evaluate(egress("10.0.0.1", 8080)).allowed


# -- custom / deny lists -------------------------------------------------------------


def test_custom_deny_lists_prepended_in_order() -> None:
    p = NetworkPolicy.custom(
        default_egress="allow",
        rules=[Rule.allow("ads.example")],
        deny_domains=["b.test", "a.test"],
        deny_domain_suffixes=[".ads.example"],
    )
    assert [r.describe() for r in p.rules] == [
        "deny egress domain b.test",
        "deny egress domain a.test",
        "deny egress domain_suffix ads.example",
        "allow egress domain ads.example",
    ]
    # deny wins over the later allow
    f = egress("203.0.113.9", sni="x.ads.example", names={"x.ads.example"})
    d = p.evaluate(f)
    assert d.action == "deny" and d.rule_index == 2
    assert d.reason == "rule 2: deny egress domain_suffix ads.example matched SNI x.ads.example"


def test_custom_defaults_and_errors() -> None:
    p = NetworkPolicy.custom()
    assert (p.default_egress, p.default_ingress, p.rules) == ("deny", "allow", ())
    with pytest.raises(PolicyError, match="action must be"):
        NetworkPolicy.custom(default_egress="block")
    with pytest.raises(PolicyError, match="list of rules"):
        NetworkPolicy.custom(rules=Rule.allow())  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="list of names"):
        NetworkPolicy.custom(deny_domains="x.test")
    with pytest.raises(PolicyError, match="URL scheme"):
        NetworkPolicy.custom(deny_domains=["https://x.test"])


# -- coerce (the seed's hash semantics) ------------------------------------------------


def test_coerce_forms() -> None:
    assert NetworkPolicy.coerce(None) == NetworkPolicy.public_only()
    assert NetworkPolicy.coerce({}) == NetworkPolicy.public_only()
    p = NetworkPolicy.public_only()
    assert NetworkPolicy.coerce(p) is p
    pre = NetworkPolicy.coerce({"preset": "public", "deny_domains": ["x.test"],
                                "deny_domain_suffixes": ["y.test"]})
    assert pre.rules[:2] == (Rule.deny(Destination.domain("x.test")),
                             Rule.deny(Destination.domain_suffix("y.test")))
    assert pre.rules[2:] == p.rules and pre.default_egress == "deny"
    only = NetworkPolicy.coerce({"deny_domains": ["x.test"]})
    assert (only.default_egress, only.default_ingress) == ("allow", "allow")
    assert only.rules == (Rule.deny(Destination.domain("x.test")),)
    cust = NetworkPolicy.coerce({"rules": [{"action": "allow", "destination": "1.1.1.1",
                                            "protocol": "tcp", "port": 443}]})
    assert (cust.default_egress, cust.default_ingress) == ("deny", "allow")
    assert cust.rules == (Rule.allow("1.1.1.1", protocol="tcp", port=443),)
    defaults_only = NetworkPolicy.coerce({"default_egress": "allow"})
    assert defaults_only == NetworkPolicy("allow", "allow", ())
    with_rule_objs = NetworkPolicy.coerce({"rules": [Rule.deny("metadata")],
                                           "deny_domains": ["z.test"]})
    assert with_rule_objs.rules[0].destination.value == "z.test"


@pytest.mark.parametrize(
    ("value", "msg"),
    [
        ({"preset": "public", "rules": []}, "cannot be combined with rules"),
        ({"preset": "public", "default_egress": "allow"}, "cannot be combined with default_egress"),
        ({"preset": "none", "default_ingress": "deny"}, "cannot be combined"),
        ({"rulez": []}, "unknown network policy keys"),
        (42, "must be a preset name"),
        ({"rules": [{"action": "allow", "port": "1-"}]}, "invalid port"),
    ],
)
def test_coerce_errors(value: Any, msg: str) -> None:
    with pytest.raises(PolicyError, match=msg):
        NetworkPolicy.coerce(value)


# -- wire format ---------------------------------------------------------------------


def test_wire_format_shape_and_json() -> None:
    d = NetworkPolicy.public_only().to_dict()
    assert d == {
        "default_egress": "deny",
        "default_ingress": "allow",
        "rules": [
            {"direction": "egress", "destination": {"group": "host"},
             "protocols": ["tcp", "udp"], "ports": [{"start": 53, "end": 53}], "action": "allow"},
            {"direction": "egress", "destination": {"group": "public"}, "protocols": [],
             "ports": [], "action": "allow"},
        ],
    }
    again = NetworkPolicy.from_dict(json.loads(json.dumps(d)))
    assert again == NetworkPolicy.public_only()


def test_from_dict_fail_closed_and_strict() -> None:
    assert NetworkPolicy.from_dict({}) == NetworkPolicy("deny", "deny", ())
    with pytest.raises(PolicyError, match="unknown policy keys"):
        NetworkPolicy.from_dict({"default": "allow"})
    with pytest.raises(PolicyError, match="rules must be a list"):
        NetworkPolicy.from_dict({"rules": "allow all"})


# -- evaluator semantics ---------------------------------------------------------------


def test_first_match_per_direction() -> None:
    p = NetworkPolicy.custom(
        default_egress="allow",
        default_ingress="deny",
        rules=[
            Rule.deny("10.0.0.0/8", direction="ingress"),
            Rule.allow("10.1.0.0/16", direction="any"),
            Rule.deny("10.0.0.0/8"),
        ],
    )
    assert p.evaluate(egress("10.1.2.3")).rule_index == 1
    assert p.evaluate(egress("10.2.0.1")).rule_index == 2
    d = p.evaluate(ingress("10.1.2.3"))
    assert (d.action, d.rule_index) == ("deny", 0)
    d = p.evaluate(ingress("192.0.2.1"))
    assert (d.action, d.rule_index) == ("deny", None)
    assert d.reason == ("no rule matched tcp ingress from 192.0.2.1 to guest port 8080; "
                        "default ingress is deny")


def test_ports_and_protocols() -> None:
    p = NetworkPolicy.custom(rules=[Rule.allow(protocol="tcp", ports=["80", "8000-8080"]),
                                    Rule.allow(protocol="icmpv4")])
    assert p.evaluate(egress("192.0.2.1", 80)).allowed
    assert p.evaluate(egress("192.0.2.1", 8080)).allowed
    assert not p.evaluate(egress("192.0.2.1", 8081)).allowed
    assert not p.evaluate(egress("192.0.2.1", 80, "udp")).allowed
    assert p.evaluate(egress("192.0.2.1", None, "icmpv4")).rule_index == 1
    # a port filter never matches a port-less (ICMP) flow
    q = NetworkPolicy.custom(rules=[Rule.allow(port=80)])
    assert not q.evaluate(egress("192.0.2.1", None, "icmpv4")).allowed


def test_cidr_family_and_mapped() -> None:
    p = NetworkPolicy.custom(rules=[Rule.allow("192.0.2.0/24"), Rule.allow("2001:db8::/32")])
    assert p.evaluate(egress("::ffff:192.0.2.7")).rule_index == 0
    assert p.evaluate(egress("2001:db8::5")).rule_index == 1
    assert not p.evaluate(egress("198.51.100.1")).allowed


def test_domain_allow_needs_sni_and_pin() -> None:
    p = NetworkPolicy.custom(rules=[Rule.allow("api.example.com", protocol="tcp", port=443)])
    ip = "203.0.113.10"
    assert p.evaluate(egress(ip, sni="api.example.com", names={"api.example.com"})).allowed
    # SNI matches but IP not pinned: not allowed (direct-IP with forged SNI)
    assert not p.evaluate(egress(ip, sni="api.example.com")).allowed
    # pinned, but SNI is another name
    assert not p.evaluate(egress(ip, sni="evil.test", names={"api.example.com"})).allowed
    # no SNI (plain TCP): the pin cache decides
    assert p.evaluate(egress(ip, names={"api.example.com"})).allowed
    assert not p.evaluate(egress(ip)).allowed
    # suffix matching is label-aligned
    s = NetworkPolicy.custom(rules=[Rule.allow(".example.com")])
    assert s.evaluate(egress(ip, names={"example.com"})).allowed
    assert s.evaluate(egress(ip, names={"a.b.example.com"})).allowed
    assert not s.evaluate(egress(ip, names={"badexample.com"})).allowed


def test_domain_deny_needs_only_name() -> None:
    p = NetworkPolicy.custom(default_egress="allow",
                             rules=[Rule.deny(".blocked.test")])
    ip = "203.0.113.20"
    # SNI alone denies, no pin required
    d = p.evaluate(egress(ip, sni="x.blocked.test"))
    assert (d.action, d.rule_index) == ("deny", 0)
    # with an SNI, a pinned blocked name for a shared IP does not deny another SNI
    assert p.evaluate(egress(ip, sni="ok.test", names={"x.blocked.test"})).allowed
    # without an SNI, the pin cache decides
    assert not p.evaluate(egress(ip, names={"x.blocked.test"})).allowed
    assert p.evaluate(egress(ip)).allowed


def test_domain_rules_on_ingress_use_cache() -> None:
    p = NetworkPolicy.custom(default_ingress="deny",
                             rules=[Rule.allow("peer.test", direction="ingress")])
    assert p.evaluate(ingress("192.0.2.3", names={"peer.test"})).allowed
    assert not p.evaluate(ingress("192.0.2.3")).allowed


def test_reasons() -> None:
    p = NetworkPolicy.public_only()
    assert p.evaluate(egress("203.0.113.5")).reason == \
        "rule 1: allow egress group public matched 203.0.113.5 (public)"
    assert p.evaluate(egress("10.0.0.1", 22)).reason == \
        "no rule matched tcp egress to 10.0.0.1:22; default egress is deny"
    c = NetworkPolicy.custom(rules=[Rule.deny("10.0.0.0/8"), Rule.allow(".ex.test")])
    assert c.evaluate(egress("10.9.9.9", 22)).reason == \
        "rule 0: deny egress cidr 10.0.0.0/8 matched 10.9.9.9"
    assert c.evaluate(egress("203.0.113.1", names={"a.ex.test"})).reason == \
        "rule 1: allow egress domain_suffix ex.test matched cached name a.ex.test for 203.0.113.1"
    v6 = p.evaluate(egress("2001:db8::1", 443, sni="x.test"))
    assert v6.reason == "rule 1: allow egress group public matched 2001:db8::1 (public)"


def test_explain_hints() -> None:
    p = NetworkPolicy.custom(rules=[Rule.allow("api.example.com", protocol="tcp", port=443),
                                    Rule.allow("203.0.113.0/24", protocol="udp")])
    f = egress("203.0.113.10", sni="api.example.com")
    text = p.explain(f)
    lines = text.splitlines()
    assert lines[0] == p.evaluate(f).reason
    assert "not pinned to that name" in text
    assert "rule 1 (allow egress cidr 203.0.113.0/24 udp) names this destination but not tcp" \
        in text
    # an allowed flow explains with its reason alone
    ok = egress("203.0.113.10", sni="api.example.com", names={"api.example.com"})
    assert p.explain(ok) == p.evaluate(ok).reason


def test_evaluate_rejects_non_flow() -> None:
    with pytest.raises(PolicyError, match="expects a Flow"):
        NetworkPolicy.public_only().evaluate(("egress", "tcp"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (("outbound", "tcp", "1.1.1.1"), "flow direction"),
        (("egress", "sctp", "1.1.1.1"), "unknown protocol"),
        (("egress", "tcp", "nope"), "not an IPv4 or IPv6"),
        (("egress", "tcp", "1.1.1.1", 70000), "flow port"),
        (("egress", "tcp", "1.1.1.1", 1, "bad sni!"), "invalid label"),
    ],
)
def test_bad_flows(args: tuple[Any, ...], msg: str) -> None:
    with pytest.raises(PolicyError, match=msg):
        Flow(*args)


# -- DNS decisions (reference §2.2) ------------------------------------------------------


def test_evaluate_dns() -> None:
    p = NetworkPolicy.custom(rules=[Rule.allow("example.com", protocol="tcp", port=443)])
    # domain rule ignores its proto/port filter for DNS; exact name only (exfil defence)
    assert p.evaluate_dns("example.com").allowed
    assert p.evaluate_dns("EXAMPLE.com.").allowed
    assert not p.evaluate_dns("secret-data.example.com").allowed
    s = NetworkPolicy.custom(rules=[Rule.allow(".example.com")])
    assert s.evaluate_dns("a.example.com").allowed
    assert not s.evaluate_dns("example.com.evil.test").allowed
    pub = NetworkPolicy.public_only()
    assert pub.evaluate_dns("anything.test").rule_index == 0  # host group DNS rule
    assert pub.evaluate_dns("anything.test", "tcp").allowed
    assert not pub.evaluate_dns("anything.test", "tcp", 853).allowed  # DoT not in allow_dns
    # cidr / other groups never match a DNS query
    c = NetworkPolicy.custom(rules=[Rule.allow("0.0.0.0/0"), Rule.allow("public")])
    assert not c.evaluate_dns("x.test").allowed
    # any with a matching transport filter
    a = NetworkPolicy.custom(rules=[Rule.allow(protocol="udp", port=53)])
    assert a.evaluate_dns("x.test").allowed and not a.evaluate_dns("x.test", "tcp").allowed
    # deny list wins
    d = NetworkPolicy.public_only().with_denied_domains(deny_domain_suffixes=["ads.test"])
    dec = d.evaluate_dns("x.ads.test")
    assert (dec.action, dec.rule_index) == ("deny", 0)
    assert dec.reason == "rule 0: deny egress domain_suffix ads.test matched DNS query x.ads.test (udp/53)"
    # ingress rules are not consulted
    i = NetworkPolicy.custom(rules=[Rule.allow("x.test", direction="ingress")])
    assert not i.evaluate_dns("x.test").allowed


def test_evaluate_dns_invalid_name_only_matches_any() -> None:
    p = NetworkPolicy.custom(rules=[Rule.deny(".test"), Rule.allow()])
    assert p.evaluate_dns("bad..name.test").rule_index == 1
    assert NetworkPolicy.custom(rules=[Rule.allow(".test")]).evaluate_dns("a b.test").action \
        == "deny"


def test_rebind_exempt() -> None:
    assert NetworkPolicy.non_local().rebind_exempt("10.1.2.3")
    assert not NetworkPolicy.public_only().rebind_exempt("10.1.2.3")
    assert not NetworkPolicy.allow_all().rebind_exempt("10.1.2.3")  # defaults never exempt
    assert not NetworkPolicy.custom(rules=[Rule.allow()]).rebind_exempt("10.1.2.3")
    assert not NetworkPolicy.custom(rules=[Rule.allow("10.0.0.0/8", port=80)]).rebind_exempt(
        "10.1.2.3")
    assert NetworkPolicy.custom(rules=[Rule.allow("10.0.0.0/8", protocol="tcp")]).rebind_exempt(
        "10.1.2.3")
    first_deny = NetworkPolicy.custom(rules=[Rule.deny("10.1.0.0/16"), Rule.allow("private")])
    assert not first_deny.rebind_exempt("10.1.2.3")
    assert first_deny.rebind_exempt("10.2.0.1")
    assert NetworkPolicy.from_profiles("host").rebind_exempt("172.16.0.1", gateway=GW)


def test_explain_only_hints_rules_that_would_decide_otherwise() -> None:
    p = NetworkPolicy.custom(rules=[Rule.deny(".ads.test")], deny_domains=[])
    # denied by default: a deny rule that did not match is not an interesting hint
    assert p.explain(egress("10.0.0.1", 22)) == p.evaluate(egress("10.0.0.1", 22)).reason
    q = NetworkPolicy.custom(default_egress="allow", rules=[Rule.deny(".ads.test")])
    text = q.explain(egress("203.0.113.1"))
    assert "no hostname is known for 203.0.113.1" in text
