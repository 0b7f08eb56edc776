"""Classifier: flow table, verdict mapping, SNI wait, counters, expiry, eviction, swaps."""

from __future__ import annotations

import random
import struct
import threading

import pytest

from netstack import (
    Classifier,
    FastPathError,
    Flow,
    NetworkPolicy,
    PinCache,
    Rule,
    Verdict,
    build_frame,
)
from tests.netstack_fastpath._tls import EXAMPLE_HELLO

from ._gen import random_policy

GUEST = "10.0.2.15"
GW = "10.0.2.2"


def syn(dst: str, dport: int, sport: int = 40000, src: str = GUEST, seq: int = 1000) -> bytes:
    return build_frame(src, dst, "tcp", sport, dport, flags=0x02, seq=seq)


def data(dst: str, dport: int, payload: bytes, seq: int, sport: int = 40000,
         flags: int = 0x18) -> bytes:
    return build_frame(GUEST, dst, "tcp", sport, dport, payload, flags=flags, seq=seq)


def V(c: Classifier, frames: list[bytes], **kw: object) -> list[str]:
    return [Verdict(v).label for v in c.classify(frames, **kw)]  # type: ignore[arg-type]


def test_verdict_mapping_per_protocol() -> None:
    c = Classifier(NetworkPolicy.public_only(), gateway=GW)
    frames = [
        syn("192.0.2.7", 443),                                           # public: allow
        syn("10.9.9.9", 22),                                             # private: RST
        build_frame(GUEST, "10.9.9.9", "udp", 5000, 123),                # private UDP: ICMP
        build_frame(GUEST, "10.9.9.9", "icmpv4"),                        # private ICMP: drop
        build_frame(GUEST, "10.9.9.9", "udp", 5000, 53),                 # DNS anywhere
        build_frame(GUEST, "8.8.8.8", "tcp", 5000, 53, flags=0x02),      # DNS over TCP
        b"\x00" * 13,                                                    # malformed
        bytes(12) + b"\x08\x06" + bytes(28),                             # ARP (bad htype)
    ]
    assert V(c, frames) == ["allow", "deny-with-reset", "deny-with-icmp-unreachable", "deny",
                            "to-dns", "to-dns", "malformed", "malformed"]
    arp = bytes(12) + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + bytes(20)
    assert V(c, [arp]) == ["allow"]
    other = bytes(12) + b"\x88\xcc" + bytes(40)
    assert V(c, [other]) == ["deny"]


def test_dns_side_doors_refused_only_when_asked() -> None:
    frames = [
        syn("192.0.2.7", 853),                                           # DoT
        build_frame(GUEST, "192.0.2.7", "udp", 5000, 853),               # DoQ
        build_frame(GUEST, "224.0.0.251", "udp", 5353, 5353),            # mDNS
        build_frame(GUEST, "224.0.0.252", "udp", 5000, 5355),            # LLMNR
        build_frame(GUEST, "10.0.2.255", "udp", 137, 137),               # NetBIOS-NS
        syn("192.0.2.7", 443),                                           # unaffected
        build_frame(GUEST, "192.0.2.7", "udp", 5000, 53),                # DNS: forwarder
    ]
    allow_all = NetworkPolicy.allow_all()
    assert V(Classifier(allow_all, gateway=GW), frames) == ["allow"] * 6 + ["to-dns"]
    c = Classifier(allow_all, gateway=GW, block_dns_bypass=True)
    assert V(c, frames) == ["deny-with-reset", "deny-with-icmp-unreachable", "deny", "deny",
                            "deny", "allow", "to-dns"]
    # ingress to those ports (a published port) is the policy's business
    ingress = build_frame("192.0.2.7", GUEST, "tcp", 40000, 853, flags=0x02)
    assert V(c, [ingress], direction="ingress") == ["allow"]
    with pytest.raises(FastPathError, match="block_dns_bypass must be a bool"):
        Classifier(allow_all, block_dns_bypass=1)  # type: ignore[arg-type]


def test_established_flow_is_a_lookup_with_counters() -> None:
    policy = NetworkPolicy.custom(rules=[Rule.allow(destination="192.0.2.0/24", protocol="tcp")])
    c = Classifier(policy)
    s = syn("192.0.2.7", 80)
    d = data("192.0.2.7", 80, b"x" * 100, 1001)
    verdicts, rules = c.classify_with_rules([s, d, d, d], now=10.0)
    assert list(verdicts) == [0, 0, 0, 0] and rules == [0, 0, 0, 0]
    info = c.flow_info(d)
    assert info is not None and info.packets == 4 and info.bytes == len(s) + 3 * len(d)
    assert info.rule_index == 0 and not info.pending
    counters = c.rule_counters()
    assert counters[0].hits == 1 and counters[0].packets == 4
    assert c.stats().flows_created == 1 and len(c) == 1
    # a different destination port is a different flow, decided by the default
    assert c.classify_with_rules([syn("198.51.100.1", 80)], now=10.0)[1] == [-1]
    assert c.rule_counters()[-2].hits == 1  # egress default


def test_idle_expiry_and_expire() -> None:
    c = Classifier(NetworkPolicy.allow_all(), tcp_idle=10, udp_idle=5)
    u = build_frame(GUEST, "192.0.2.1", "udp", 5000, 9999)
    t = syn("192.0.2.1", 80)
    c.classify([u, t], now=0.0)
    assert len(c) == 2
    c.expire(now=6.0)       # the UDP flow is idle > 5 s
    assert len(c) == 1
    c.classify([t], now=9.0)  # seen at 9: not idle
    c.expire(now=15.0)
    assert len(c) == 1
    c.expire(now=19.5)
    assert len(c) == 0 and c.stats().flows_expired == 2


def test_eviction_keeps_the_table_bounded() -> None:
    c = Classifier(NetworkPolicy.allow_all(), max_flows=64)
    frames = [syn("192.0.2.1", 80, sport=1000 + i) for i in range(1000)]
    for i, f in enumerate(frames):
        c.classify([f], now=float(i))
    assert len(c) == 64
    st = c.stats()
    assert st.flows_evicted == 1000 - 64
    # the most recent flow survived
    assert c.flow_info(frames[-1]) is not None


def test_recompile_swaps_and_reevaluates_flows() -> None:
    allow = NetworkPolicy.allow_all()
    deny = NetworkPolicy.none()
    c = Classifier(allow)
    s = syn("192.0.2.7", 80)
    assert V(c, [s]) == ["allow"]
    c.recompile(deny)
    assert V(c, [s]) == ["deny-with-reset"]
    assert c.rule_counters()[-2].hits == 1


def test_recompile_while_a_batch_runs_in_another_thread() -> None:
    rng = random.Random(5)
    policies = [random_policy(rng, 40) for _ in range(20)]
    c = Classifier(policies[0], max_flows=4096)
    frames = [syn(f"192.0.2.{i % 250}", 1 + i % 1000, sport=1024 + i) for i in range(2000)]
    buf = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.is_set():
                r = c.classify_stream(buf)
                assert r.count == len(frames) and not r.broken
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    th = threading.Thread(target=loop)
    th.start()
    for p in policies * 3:
        c.recompile(p)
    stop.set()
    th.join(30)
    assert not errors
    # after the last swap, verdicts follow the last policy
    last = policies[-1]
    _, rules = c.classify_with_rules(frames[:50])
    for f, r in zip(frames[:50], rules, strict=True):
        ip = f"192.0.2.{frames.index(f) % 250}"
        want = last.evaluate(Flow("egress", "tcp", ip, 1 + frames.index(f) % 1000)).rule_index
        assert (None if r < 0 else r) == want


def test_stream_api_partial_and_broken() -> None:
    c = Classifier(NetworkPolicy.allow_all())
    f1 = syn("192.0.2.1", 80)
    f2 = build_frame(GUEST, "192.0.2.1", "udp", 1, 2, b"hello")
    buf = b"".join(len(f).to_bytes(4, "big") + f for f in (f1, f2))
    r = c.classify_stream(buf + (100).to_bytes(4, "big") + b"partial")
    assert r.verdicts == b"\x00\x00" and r.consumed == len(buf) and not r.broken
    r = c.classify_stream(buf + (70000).to_bytes(4, "big") + bytes(10))
    assert r.verdicts == b"\x00\x00\x07" and r.broken and r.consumed == len(buf)
    r = c.classify_stream(memoryview(bytearray(buf)), max_frames=1)
    assert r.count == 1 and r.consumed == 4 + len(f1)


def test_oversize_and_max_size_frames() -> None:
    c = Classifier(NetworkPolicy.allow_all())
    big = build_frame(GUEST, "192.0.2.1", "udp", 1, 2, b"\0" * (65535 - 28))
    assert len(big) == 65549
    assert V(c, [big]) == ["allow"]
    assert V(c, [big + b"\0"]) == ["malformed"]


def test_fragments_follow_the_first_fragment() -> None:
    policy = NetworkPolicy.custom(rules=[Rule.allow(destination="192.0.2.1", protocol="udp",
                                                    port=9000)])
    c = Classifier(policy)
    first = bytearray(build_frame(GUEST, "192.0.2.1", "udp", 5000, 9000, b"a" * 64))
    first[14 + 4:14 + 6] = (77).to_bytes(2, "big")         # IP id
    first[14 + 6:14 + 8] = (0x2000).to_bytes(2, "big")     # MF, offset 0
    later = bytearray(first)
    later[14 + 6:14 + 8] = (9).to_bytes(2, "big")          # offset 72, last
    stray = bytearray(later)
    stray[14 + 4:14 + 6] = (78).to_bytes(2, "big")
    assert V(c, [bytes(first), bytes(later), bytes(stray)]) == ["allow", "allow", "deny"]


def _segments(hello: bytes, cuts: list[int]) -> list[bytes]:
    out, prev = [], 0
    for cut in [*cuts, len(hello)]:
        out.append(hello[prev:cut])
        prev = cut
    return [s for s in out if s]


def test_sni_wait_then_decide_across_segments() -> None:
    pins = PinCache()
    policy = NetworkPolicy.custom(rules=[Rule.allow(destination="example.com", protocol="tcp")])
    c = Classifier(policy, pins=pins)
    pins.pin("example.com", ["192.0.2.9"], ttl=300, now=0.0)
    s = syn("192.0.2.9", 443, seq=5000)
    segs = _segments(EXAMPLE_HELLO, [3, 40, 41])
    frames = [s]
    seq = 5001
    for seg in segs:
        frames.append(data("192.0.2.9", 443, seg, seq))
        seq += len(seg)
    got = V(c, frames, now=1.0)
    assert got == ["need-more"] * len(segs) + ["allow"]
    assert V(c, [data("192.0.2.9", 443, b"GET", seq)], now=1.5) == ["allow"]
    # an IP not pinned to example.com: the allow rule cannot match whatever the SNI
    # says, so the SYN is decided at once (no wait)
    frames2 = [syn("192.0.2.10", 443, sport=40001), data("192.0.2.10", 443, EXAMPLE_HELLO, 1001,
                                                          sport=40001)]
    assert V(c, frames2, now=1.0) == ["deny-with-reset", "deny-with-reset"]


def test_sni_deny_rule_catches_direct_ip_connects() -> None:
    policy = NetworkPolicy(default_egress="allow", default_ingress="allow",
                           rules=(Rule.deny(destination=".example.com"),))
    c = Classifier(policy)
    frames = [syn("203.0.113.7", 443), data("203.0.113.7", 443, EXAMPLE_HELLO, 1001)]
    assert V(c, frames, now=0.0) == ["need-more", "deny-with-reset"]
    # plain HTTP to the same address: not TLS, so no SNI: decided by the default
    frames = [syn("203.0.113.7", 80, sport=1), data("203.0.113.7", 80, b"GET / HTTP/1.1\r\n", 1001,
                                                     sport=1)]
    assert V(c, frames, now=0.0) == ["need-more", "allow"]


def test_retransmitted_and_out_of_order_segments() -> None:
    policy = NetworkPolicy(default_egress="allow", default_ingress="allow",
                           rules=(Rule.deny(destination="example.com"),))
    c = Classifier(policy)
    h = EXAMPLE_HELLO
    frames = [
        syn("203.0.113.7", 443, seq=100),
        data("203.0.113.7", 443, h[20:40], 121),   # out of order: ignored
        data("203.0.113.7", 443, h[:30], 101),     # in order
        data("203.0.113.7", 443, h[:30], 101),     # retransmission
        data("203.0.113.7", 443, h[10:], 111),     # overlaps the buffered part
    ]
    assert V(c, frames, now=0.0) == ["need-more"] * 4 + ["deny-with-reset"]


def test_hello_time_cap_and_fin() -> None:
    policy = NetworkPolicy(default_egress="allow", default_ingress="allow",
                           rules=(Rule.deny(destination="example.com"),))
    c = Classifier(policy, hello_timeout=2.0)
    assert V(c, [syn("203.0.113.7", 443)], now=0.0) == ["need-more"]
    assert V(c, [data("203.0.113.7", 443, EXAMPLE_HELLO[:10], 1001)], now=1.0) == ["need-more"]
    assert V(c, [data("203.0.113.7", 443, b"", 1011, flags=0x10)], now=2.5) == ["allow"]
    assert V(c, [syn("203.0.113.7", 443, sport=2)], now=0.0) == ["need-more"]
    assert V(c, [data("203.0.113.7", 443, b"", 1001, sport=2, flags=0x11)], now=0.1) == ["allow"]


def test_hello_budget_fails_closed() -> None:
    policy = NetworkPolicy(default_egress="allow", default_ingress="allow",
                           rules=(Rule.deny(destination="example.com"),))
    c = Classifier(policy, hello_cap=1024, hello_budget=2048)
    out = []
    for i in range(3):
        out += V(c, [syn("203.0.113.7", 443, sport=10 + i),
                     data("203.0.113.7", 443, EXAMPLE_HELLO[:10], 1001, sport=10 + i)], now=0.0)
    assert out == ["need-more"] * 5 + ["deny-with-reset"]
    assert c.stats().hello_denied == 1


def test_to_proxy_for_intercepted_names() -> None:
    c = Classifier(NetworkPolicy.allow_all(), intercept=["example.com"])
    frames = [syn("192.0.2.9", 443), data("192.0.2.9", 443, EXAMPLE_HELLO, 1001)]
    assert V(c, frames, now=0.0) == ["need-more", "to-proxy"]
    # other ports are not intercepted and need no SNI
    assert V(c, [syn("192.0.2.9", 80, sport=5)], now=0.0) == ["allow"]


def test_no_sni_wait_when_an_address_rule_decides_first() -> None:
    policy = NetworkPolicy.custom(rules=[
        Rule.allow(destination="192.0.2.0/24"),
        Rule.deny(destination="example.com"),
    ])
    c = Classifier(policy)
    assert V(c, [syn("192.0.2.9", 443)], now=0.0) == ["allow"]
    assert V(c, [syn("198.51.100.9", 443)], now=0.0) == ["need-more"]


def test_pin_cache_feeds_names_for_udp() -> None:
    pins = PinCache()
    policy = NetworkPolicy.custom(rules=[Rule.allow(destination=".example.net", protocol="udp")])
    c = Classifier(policy, pins=pins)
    f = build_frame(GUEST, "198.51.100.4", "udp", 5000, 4444)
    assert V(c, [f], now=0.0) == ["deny-with-icmp-unreachable"]
    pins.pin("cdn.example.net", ["198.51.100.4"], ttl=10, now=0.0)
    c.recompile(policy)  # re-evaluates the flow on its next frame
    assert V(c, [f], now=1.0) == ["allow"]


def test_ingress_direction_matches_peer_and_guest_port() -> None:
    policy = NetworkPolicy(default_egress="deny", default_ingress="deny", rules=(
        Rule.allow(destination="192.0.2.0/24", direction="ingress", protocol="tcp", port=8080),))
    c = Classifier(policy)
    inbound = build_frame("192.0.2.50", GUEST, "tcp", 51000, 8080, flags=0x02)
    assert V(c, [inbound], direction="ingress") == ["allow"]
    assert V(c, [inbound], direction="egress") == ["deny-with-reset"]


def test_bad_configuration_raises_typed_errors() -> None:
    with pytest.raises(FastPathError, match="max_flows"):
        Classifier(NetworkPolicy.none(), max_flows=3)
    with pytest.raises(FastPathError, match="hello_cap"):
        Classifier(NetworkPolicy.none(), hello_cap=10**6)
    with pytest.raises(FastPathError, match="direction"):
        Classifier(NetworkPolicy.none()).classify([b""], direction="sideways")  # type: ignore[arg-type]
    c = Classifier(NetworkPolicy.none())
    c.close()
    with pytest.raises(FastPathError, match="closed"):
        c.classify([b"x"])


def test_counters_across_the_sni_wait() -> None:
    policy = NetworkPolicy(default_egress="allow", default_ingress="allow",
                           rules=(Rule.deny(destination="other.example"),))
    c = Classifier(policy)
    frames = [syn("203.0.113.7", 443), data("203.0.113.7", 443, EXAMPLE_HELLO[:50], 1001),
              data("203.0.113.7", 443, EXAMPLE_HELLO[50:], 1051),
              data("203.0.113.7", 443, b"x" * 10, 1001 + len(EXAMPLE_HELLO))]
    assert V(c, frames, now=0.0) == ["need-more", "need-more", "allow", "allow"]
    info = c.flow_info(frames[0])
    assert info is not None and info.packets == 4 and info.bytes == sum(map(len, frames))
    default = c.rule_counters()[-2]
    assert (default.hits, default.packets) == (1, 2)  # counted from the decision on


def test_fragmented_dns_query_stays_to_dns() -> None:
    c = Classifier(NetworkPolicy.none())
    first = bytearray(build_frame(GUEST, "192.0.2.53", "udp", 5000, 53, b"q" * 64))
    first[14 + 4:14 + 6] = (5).to_bytes(2, "big")
    first[14 + 6:14 + 8] = (0x2000).to_bytes(2, "big")
    later = bytearray(first)
    later[14 + 6:14 + 8] = (9).to_bytes(2, "big")
    assert V(c, [bytes(first), bytes(later)]) == ["to-dns", "to-dns"]


def test_pending_flow_is_decided_once_a_new_policy_needs_no_sni() -> None:
    # a flow waiting for its ClientHello under a policy with a domain deny rule,
    # then a recompile to tables that decide it without an SNI: its next frame is
    # decided by the new tables (was: stuck on NEED_MORE until the hello came)
    waiting = NetworkPolicy(default_egress="allow", default_ingress="allow",
                            rules=(Rule.deny(destination=".blocked.example"),))
    c = Classifier(waiting)
    first = syn("192.0.2.9", 443)
    assert c.classify([first], now=1.0) == bytes([Verdict.NEED_MORE])
    c.recompile(NetworkPolicy.custom(default_egress="deny",
                                     rules=[Rule.allow(destination="192.0.2.0/24")]))
    ack = build_frame(GUEST, "192.0.2.9", "tcp", 40000, 443, flags=0x10)
    verdicts, rules = c.classify_with_rules([ack], now=1.5)
    assert verdicts == bytes([Verdict.ALLOW]) and rules == [0]
    info = c.flow_info(ack)
    assert info is not None and not info.pending and c.stats().hello_bytes == 0
    # still pending when the new tables need the SNI too
    c.recompile(waiting)
    other = syn("192.0.2.10", 443)
    assert c.classify([other], now=2.0) == bytes([Verdict.NEED_MORE])
    c.recompile(NetworkPolicy(default_egress="allow", default_ingress="allow",
                              rules=(Rule.deny(destination="x.blocked.example"),)))
    again = build_frame(GUEST, "192.0.2.10", "tcp", 40000, 443, flags=0x10)
    assert c.classify([again], now=2.5) == bytes([Verdict.NEED_MORE])
