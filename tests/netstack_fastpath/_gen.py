"""Random policies and flows for the differential tests (seeded, deterministic)."""

from __future__ import annotations

import ipaddress
import random

from netstack import Destination, Flow, NetworkPolicy, Rule

GATEWAYS = (["10.0.2.2"], ["172.16.0.1", "fd42:6d73:62::1"], [])
ADDRESSES = (
    "10.0.2.2", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1",
    "127.0.0.1", "169.254.169.254", "169.254.1.1", "224.0.0.1", "239.255.255.250",
    "0.0.0.0", "255.255.255.255", "192.0.2.7", "198.51.100.10", "203.0.113.7", "8.8.8.8",
    "::", "::1", "fd42:6d73:62::1", "fc00::5", "fe80::1", "ff02::1", "2001:db8::1",
    "2001:db8:100::10", "::ffff:10.0.0.1", "::ffff:192.0.2.7", "64:ff9b::c000:207",
)
NAMES = ("example.com", "a.example.com", "b.a.example.com", "badexample.com", "example.net",
         "cdn.example.net", "api.test", "x.api.test", "com", "localhost")
GROUPS = ("host", "metadata", "loopback", "private", "link_local", "multicast", "public")
PROTOCOLS = ("tcp", "udp", "icmpv4", "icmpv6")


def random_network(rng: random.Random) -> str:
    base = ipaddress.ip_address(rng.choice(ADDRESSES))
    if isinstance(base, ipaddress.IPv6Address) and base.ipv4_mapped is not None:
        base = base.ipv4_mapped
    bits = base.max_prefixlen
    prefix = rng.choice((0, 1, 4, 8, 10, 12, 16, 24, 30, 31, 32, 48, 64, 96, 120, 127, 128))
    prefix = min(prefix, bits)
    return str(ipaddress.ip_network(f"{base}/{prefix}", strict=False))


def random_destination(rng: random.Random) -> Destination:
    kind = rng.choice(("any", "cidr", "cidr", "domain", "domain_suffix", "group"))
    if kind == "any":
        return Destination.any()
    if kind == "cidr":
        return Destination.cidr(random_network(rng))
    if kind == "domain":
        return Destination.domain(rng.choice(NAMES))
    if kind == "domain_suffix":
        return Destination.domain_suffix(rng.choice(NAMES))
    return Destination.group(rng.choice(GROUPS))


def random_ports(rng: random.Random) -> list[tuple[int, int]]:
    out = []
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        lo = rng.choice((1, 22, 53, 80, 443, 1000, 8080, 65535, rng.randrange(1, 65536)))
        hi = min(65535, lo + rng.choice((0, 0, 1, 100, 70000)))
        out.append((lo, hi))
    return out


def random_rule(rng: random.Random) -> Rule:
    protos = rng.sample(PROTOCOLS, rng.choice((0, 0, 1, 1, 2, 3)))
    action = rng.choice(("allow", "deny"))
    destination = random_destination(rng)
    direction = rng.choice(("egress", "egress", "ingress", "any"))
    ports = random_ports(rng)
    icmp = [p for p in protos if p.startswith("icmp")]
    if icmp and (ports or direction != "egress"):
        # ICMP rules are egress-only and port-less: drop ICMP, or the ports and direction
        if len(icmp) < len(protos) and rng.random() < 0.5:
            protos = [p for p in protos if not p.startswith("icmp")]
        else:
            direction, ports = "egress", []
    return Rule.build(action, destination=destination, direction=direction,
                      protocols=protos or None, ports=ports or None)


def random_policy(rng: random.Random, max_rules: int = 12) -> NetworkPolicy:
    rules = tuple(random_rule(rng) for _ in range(rng.randrange(max_rules + 1)))
    return NetworkPolicy(default_egress=rng.choice(("allow", "deny")),
                         default_ingress=rng.choice(("allow", "deny")), rules=rules)


def random_flow(rng: random.Random, gateway: list[str]) -> Flow:
    proto = rng.choice(PROTOCOLS)
    port = None if rng.random() < 0.15 else rng.choice(
        (0, 22, 53, 80, 443, 1000, 8080, 65535, rng.randrange(65536)))
    sni = rng.choice(NAMES) if rng.random() < 0.4 else None
    names = rng.sample(NAMES, rng.choice((0, 0, 1, 2, 3)))
    return Flow(rng.choice(("egress", "ingress")), proto, rng.choice(ADDRESSES), port,
                sni=sni, names=names, gateway=gateway)
