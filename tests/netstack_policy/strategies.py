"""Hypothesis strategies for policies and flows (shared by policy and fast-path tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from netstack import Destination, Flow, NetworkPolicy, Rule

GATEWAY = ("172.16.0.1", "fd42:6d73:62::1")
NAMES = ("example.com", "api.example.com", "a.b.example.com", "ads.test", "x.ads.test",
         "badexample.com", "test", "cdn.test")

# Addresses near every group boundary, plus random ones.
SPECIAL_V4 = ["0.0.0.0", "172.16.0.1", "169.254.169.254", "127.0.0.1", "10.0.0.1",
              "172.31.255.255", "192.168.1.1", "100.64.0.1", "169.254.1.1", "224.0.0.1",
              "203.0.113.9", "192.0.2.1", "255.255.255.255"]
SPECIAL_V6 = ["::", "fd42:6d73:62::1", "::1", "fc00::1", "fe80::1", "ff02::1", "2001:db8::1",
              "::ffff:10.0.0.1"]

ipv4 = st.one_of(st.sampled_from(SPECIAL_V4),
                 st.integers(0, 2**32 - 1).map(lambda n: ".".join(str((n >> s) & 255)
                                                                   for s in (24, 16, 8, 0))))
ipv6 = st.one_of(st.sampled_from(SPECIAL_V6),
                 st.integers(0, 2**128 - 1).map(lambda n: str(__import__("ipaddress")
                                                              .IPv6Address(n))))
addresses = st.one_of(ipv4, ipv6)


@st.composite
def cidrs(draw: st.DrawFn) -> Destination:
    import ipaddress

    ip = ipaddress.ip_address(draw(addresses))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = draw(st.integers(0, ip.max_prefixlen))
    return Destination.cidr(str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False)))


destinations = st.one_of(
    st.just(Destination.any()),
    cidrs(),
    st.sampled_from(NAMES).map(Destination.domain),
    st.sampled_from(NAMES).map(Destination.domain_suffix),
    st.sampled_from(("public", "loopback", "private", "link_local", "metadata", "multicast",
                     "host")).map(Destination.group),
)

port_ranges = st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(
    lambda t: (min(t), max(t)))


@st.composite
def rules(draw: st.DrawFn) -> Rule:
    protocols = draw(st.lists(st.sampled_from(("tcp", "udp", "icmpv4", "icmpv6")), max_size=2))
    direction = draw(st.sampled_from(("egress", "ingress", "any")))
    ports = draw(st.lists(st.one_of(port_ranges, st.sampled_from([(53, 53), (443, 443)])),
                          max_size=2))
    if {"icmpv4", "icmpv6"} & set(protocols):
        # an ICMP rule is egress-only and port-less (anything else is refused)
        direction, ports = "egress", []
    return Rule.build(
        draw(st.sampled_from(("allow", "deny"))),
        destination=draw(destinations),
        direction=direction,
        protocols=protocols,
        ports=ports,
    )


@st.composite
def policies(draw: st.DrawFn, max_rules: int = 8) -> NetworkPolicy:
    return NetworkPolicy(
        draw(st.sampled_from(("allow", "deny"))),
        draw(st.sampled_from(("allow", "deny"))),
        tuple(draw(st.lists(rules(), max_size=max_rules))),
    )


@st.composite
def flows(draw: st.DrawFn) -> Flow:
    proto = draw(st.sampled_from(("tcp", "udp", "icmpv4", "icmpv6")))
    port = None if proto.startswith("icmp") else draw(
        st.one_of(st.sampled_from([53, 443, 80]), st.integers(0, 65535)))
    return Flow(
        draw(st.sampled_from(("egress", "ingress"))),
        proto,
        draw(addresses),
        port,
        sni=draw(st.none() | st.sampled_from(NAMES)),
        names=draw(st.frozensets(st.sampled_from(NAMES), max_size=3)),
        gateway=GATEWAY,
    )
