"""The C evaluator agrees with policy.evaluate (action AND rule index), bit for bit."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given
from hypothesis import strategies as st

from netstack import Classifier, CompiledEvaluator, Flow, NetworkPolicy, Rule

from ._gen import GATEWAYS, random_flow, random_policy


def _reference(policy: NetworkPolicy, flow: Flow) -> tuple[str, int | None]:
    d = policy.evaluate(flow)
    return d.action, d.rule_index


def test_100k_random_cases_zero_mismatches() -> None:
    rng = random.Random(20261129)
    cases = mismatches = 0
    examples: list[str] = []
    while cases < 100_000:
        policy = random_policy(rng)
        gw = rng.choice(GATEWAYS)
        with CompiledEvaluator(policy) as ev:
            for _ in range(50):
                flow = random_flow(rng, gw)
                got, want = ev.evaluate(flow), _reference(policy, flow)
                cases += 1
                if got != want:
                    mismatches += 1
                    if len(examples) < 5:
                        examples.append(f"{policy.rules} {flow}: C {got} != ref {want}")
    assert mismatches == 0, "\n".join(examples)


@given(st.randoms(use_true_random=False))
def test_hypothesis_policies_and_flows(rng: random.Random) -> None:
    """Hypothesis drives (and shrinks) every choice of the policy and flow generators."""
    policy = random_policy(rng, max_rules=30)
    gw = rng.choice(GATEWAYS)
    ev = CompiledEvaluator(policy)
    for _ in range(20):
        flow = random_flow(rng, gw)
        assert ev.evaluate(flow) == _reference(policy, flow), (policy, flow)


def test_classifier_evaluate_matches_and_follows_recompile() -> None:
    rng = random.Random(7)
    a, b = random_policy(rng), random_policy(rng)
    c = Classifier(a)
    for _ in range(500):
        f = random_flow(rng, ["10.0.2.2"])
        assert c.evaluate(f) == _reference(a, f)
    c.recompile(b)
    for _ in range(500):
        f = random_flow(rng, [])
        assert c.evaluate(f) == _reference(b, f)


def test_thousands_of_cidr_rules_keep_first_match_order() -> None:
    rng = random.Random(3)
    rules = []
    for i in range(2000):
        net = f"10.{(i >> 8) & 255}.{i & 255}.0/{rng.choice((16, 20, 24, 28))}"
        rules.append(Rule.build(rng.choice(("allow", "deny")),
                                destination=str(ipaddress.ip_network(net, strict=False)),
                                protocols=rng.choice((None, "tcp", "udp")),
                                ports=rng.choice((None, 443, (1000, 2000)))))
    policy = NetworkPolicy(default_egress="deny", default_ingress="allow", rules=tuple(rules))
    ev = CompiledEvaluator(policy)
    for _ in range(1000):
        ip = f"10.{rng.randrange(9)}.{rng.randrange(256)}.{rng.randrange(256)}"
        flow = Flow("egress", rng.choice(("tcp", "udp")), ip, rng.choice((443, 1500, 80)))
        assert ev.evaluate(flow) == _reference(policy, flow)


def test_thousands_of_domain_rules_keep_first_match_order() -> None:
    rng = random.Random(4)
    words = ["ads", "cdn", "api", "x", "track", "static", "m", "eu"]
    zones = [f"z{i}.example" for i in range(300)]
    rules = []
    for _ in range(3000):
        name = f"{rng.choice(words)}.{rng.choice(zones)}" if rng.random() < 0.7 else rng.choice(zones)
        rules.append(Rule.build(rng.choice(("allow", "deny")),
                                destination=rng.choice((f".{name}", name)),
                                protocols=rng.choice((None, "tcp", "udp")),
                                ports=rng.choice((None, 443))))
    policy = NetworkPolicy(default_egress="deny", default_ingress="allow", rules=tuple(rules))
    ev = CompiledEvaluator(policy)

    def host() -> str:
        return ".".join([rng.choice(words) for _ in range(rng.randrange(3))] + [rng.choice(zones)])

    for _ in range(1500):
        flow = Flow("egress", rng.choice(("tcp", "udp")), "203.0.113.7", rng.choice((443, 80)),
                    sni=host() if rng.random() < 0.5 else None,
                    names=[host() for _ in range(rng.randrange(3))])
        assert ev.evaluate(flow) == _reference(policy, flow), flow


def test_invalid_names_never_match() -> None:
    from netstack import PinCache
    from tests.netstack_fastpath._dns import build_response

    pins = PinCache()
    assert pins.learn(build_response("-bad.example.com", [("a", "192.0.2.1", 60)])) == 0
    assert pins.learn(build_response("x*y.example.com", [("a", "192.0.2.1", 60)])) == 0
    assert pins.names("192.0.2.1") == frozenset()


def test_ipv4_slash16_buckets_small_and_overfull() -> None:
    """IPv4 rules of length >= 16 are scanned per /16 bucket, overfull buckets
    (more than 48 rules) by hash probes; mixed with short prefixes, any/group
    rules, directions and multi-range port filters, first match must hold."""
    rng = random.Random(16)
    crowded = ["198.51", "10.7"]          # hundreds of rules each: hash-probe path
    sparse = [f"100.{i}" for i in range(40)] + ["203.0"]  # a few rules each: bucket scan
    rules = []
    for _ in range(1500):
        roll = rng.random()
        if roll < 0.03:
            dest = rng.choice(("public", "private", "0.0.0.0/0", "any"))
        elif roll < 0.1:
            dest = str(ipaddress.ip_network(
                f"{rng.choice((10, 100, 198, 203))}.{rng.randrange(256)}.0.0/{rng.randrange(1, 16)}",
                strict=False))
        else:
            top = rng.choice(crowded) if rng.random() < 0.6 else rng.choice(sparse)
            dest = str(ipaddress.ip_network(
                f"{top}.{rng.randrange(4)}.{rng.randrange(256)}/{rng.randrange(16, 33)}",
                strict=False))
        ports = rng.choice((None, 443, (1000, 2000), [(1, 10), (20, 30), (440, 450), (1500, 1600)]))
        direction = rng.choice(("egress", "egress", "ingress", "any"))
        protocols = rng.choice((None, "tcp", "udp", ["tcp", "icmpv4"]))
        if protocols == ["tcp", "icmpv4"] and (ports is not None or direction != "egress"):
            protocols = ["tcp", "udp"]   # ICMP rules are egress-only and port-less
        rules.append(Rule.build(rng.choice(("allow", "deny")), destination=dest,
                                direction=direction, protocols=protocols, ports=ports))
    policy = NetworkPolicy(default_egress="deny", default_ingress="allow", rules=tuple(rules))
    ev = CompiledEvaluator(policy)
    tops = crowded + sparse + ["100.200", "8.8"]
    for _ in range(4000):
        ip = f"{rng.choice(tops)}.{rng.randrange(4)}.{rng.randrange(256)}"
        port = rng.choice((None, 5, 25, 443, 445, 1500, 1550, 80))
        proto = rng.choice(("tcp", "udp", "icmpv4"))
        flow = Flow(rng.choice(("egress", "ingress")), proto, ip,
                    None if proto == "icmpv4" else port)
        assert ev.evaluate(flow) == _reference(policy, flow), flow
