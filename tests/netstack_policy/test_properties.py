"""Property tests of the policy model."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from netstack import Flow, NetworkPolicy, Rule

from .strategies import NAMES, destinations, flows, policies, rules


@given(policies())
def test_wire_roundtrip(policy: NetworkPolicy) -> None:
    wire = json.loads(json.dumps(policy.to_dict()))
    assert NetworkPolicy.from_dict(wire) == policy


@given(rules())
def test_rule_roundtrip(rule: Rule) -> None:
    assert Rule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


@given(policies(), flows())
def test_evaluate_total_and_consistent(policy: NetworkPolicy, flow: Flow) -> None:
    d = policy.evaluate(flow)
    assert d.action in ("allow", "deny")
    if d.rule_index is None:
        want = policy.default_egress if flow.direction == "egress" else policy.default_ingress
        assert d.action == want
    else:
        assert policy.rules[d.rule_index].action == d.action
        assert d.reason.startswith(f"rule {d.rule_index}: ")
    assert policy.explain(flow).splitlines()[0] == d.reason


@given(policies(), destinations, st.sampled_from(("egress", "any")), flows())
def test_prepending_deny_never_allows_more(policy: NetworkPolicy, dest, direction, flow: Flow):
    stricter = NetworkPolicy(policy.default_egress, policy.default_ingress,
                             (Rule.build("deny", destination=dest, direction=direction),
                              *policy.rules))
    if not policy.evaluate(flow).allowed:
        assert not stricter.evaluate(flow).allowed


@given(policies(), st.sampled_from(NAMES) | st.text(max_size=20),
       st.sampled_from(("udp", "tcp")), st.sampled_from((53, 853)))
def test_evaluate_dns_total(policy: NetworkPolicy, qname: str, proto: str, port: int) -> None:
    d = policy.evaluate_dns(qname, proto, port)
    assert d.action in ("allow", "deny")
    stricter = NetworkPolicy(policy.default_egress, policy.default_ingress,
                             (Rule.deny(".test"), *policy.rules))
    if not d.allowed:
        assert not stricter.evaluate_dns(qname, proto, port).allowed


@given(st.lists(st.sampled_from(("public", "private", "host"))))
def test_profiles_order_independent(profiles: list[str]) -> None:
    assert NetworkPolicy.from_profiles(*profiles) == NetworkPolicy.from_profiles(
        *reversed(profiles))
