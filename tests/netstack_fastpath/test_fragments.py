"""IP fragments in the classifier and its reply lookups (netstack/csrc/frag.c), no root.

A later fragment has no L4 header: it gets the verdict recorded for its datagram's first
fragment (same side, addresses, id, IPv4 protocol, same policy tables), or is dropped -
when its first fragment was not seen (or came later), was denied, expired, or when it
overlaps the bytes of its first fragment or ends past 65,535 bytes.
"""

from __future__ import annotations

import struct

import pytest

from netstack import Classifier, FastPathError, NetworkPolicy, PinCache, Rule, Verdict, build_frame
from netstack._fastpath import lib

from ._frags import frag4, frag6, fragment4, fragment6

GUEST, REMOTE, OTHER = "10.0.2.15", "192.0.2.1", "192.0.2.99"
GUEST6, REMOTE6 = "fd00::15", "2001:db8::1"
ALLOW_UDP = NetworkPolicy.custom(rules=[
    Rule.allow(destination="192.0.2.1", protocol="udp", port=9000),
    Rule.allow(destination="2001:db8::1", protocol="udp", port=9000),
    Rule.allow(destination="192.0.2.1", protocol="icmpv4"),
    Rule.allow(destination="192.0.2.1", protocol="tcp", port=80),
])


def V(c: Classifier, frames: list[bytes], now: float = 1.0,
      direction: str = "egress") -> list[str]:
    out = c.classify(frames, now=now, direction=direction)  # type: ignore[arg-type]
    return [Verdict(v).label for v in out]


def reply(c: Classifier, frame: bytes, now: float = 1.0) -> int:
    return int(lib.ns_ctx_reply_lookup(c.handle, frame, len(frame), now))


def big_udp(src: str = GUEST, dst: str = REMOTE, sport: int = 5000, dport: int = 9000,
            n: int = 3000) -> bytes:
    return build_frame(src, dst, "udp", sport, dport, bytes(range(256)) * (n // 256) + bytes(
        n % 256))


def test_later_fragments_follow_an_allowed_first_fragment_and_count_for_its_rule() -> None:
    c = Classifier(ALLOW_UDP)
    frags = fragment4(big_udp(), [1480, 1480])
    assert V(c, frags) == ["allow"] * 3
    verdicts, rules = c.classify_with_rules(frags[1:], now=1.5)
    assert verdicts == bytes([Verdict.ALLOW] * 2) and rules == [0, 0]
    counter = c.rule_counters()[0]
    assert (counter.hits, counter.packets) == (1, 5)
    assert counter.bytes == sum(map(len, frags)) + sum(map(len, frags[1:]))
    st = c.stats()
    assert (st.fragments_recorded, st.fragments_followed, st.fragments_live) == (1, 4, 1)
    assert st.live_flows == 1  # fragment records are not flows


def test_denied_first_fragment_and_stray_or_early_later_fragments_are_dropped() -> None:
    c = Classifier(ALLOW_UDP)
    denied = fragment4(big_udp(dport=9001), [1480], ident=1)
    assert V(c, denied) == ["deny-with-icmp-unreachable", "deny"]
    stray = frag4(GUEST, REMOTE, 17, 2, 1480, False, bytes(100))  # no first fragment at all
    assert V(c, [stray]) == ["deny"]
    # out of order: a later fragment before its first fragment is dropped, not held
    first, later = fragment4(big_udp(), [1480], ident=3)
    assert V(c, [later, first, later]) == ["deny", "allow", "allow"]
    st = c.stats()
    assert st.fragments_unmatched == 3 and st.fragments_followed == 1
    assert st.fragments_recorded == 1  # the denied first fragment took no slot


def test_each_key_field_separates_datagrams() -> None:
    c = Classifier(ALLOW_UDP)
    first, later = fragment4(big_udp(), [1480], ident=7)
    assert V(c, [first]) == ["allow"]
    ip = 14
    variants = []
    for field, value in ((4, b"\x00\x08"), (9, b"\x06"), (12, bytes([10, 0, 2, 16])),
                         (16, bytes([192, 0, 2, 2]))):  # id, protocol, source, destination
        v = bytearray(later)
        v[ip + field:ip + field + len(value)] = value
        variants.append(bytes(v))
    assert V(c, variants) == ["deny"] * 4
    # the same datagram id from the other side (a frame from the uplink) matches nothing
    assert V(c, [later], direction="ingress") == ["deny"]
    assert reply(c, later) == 0
    assert V(c, [later]) == ["allow"]


def test_a_denied_first_fragment_revokes_an_earlier_record_of_the_same_id() -> None:
    # the id is reused (16 bits wrap): the newest first fragment decides
    c = Classifier(ALLOW_UDP)
    ok_first, ok_later = fragment4(big_udp(), [1480], ident=9)
    bad_first, bad_later = fragment4(big_udp(dport=9001), [1480], ident=9)
    assert V(c, [ok_first, bad_first, ok_later, bad_later]) == [
        "allow", "deny-with-icmp-unreachable", "deny", "deny"]


def test_overlapping_and_oversized_later_fragments_are_dropped() -> None:
    c = Classifier(ALLOW_UDP)
    first, _ = fragment4(big_udp(), [1480], ident=11)
    assert V(c, [first]) == ["allow"]
    inside = frag4(GUEST, REMOTE, 17, 11, 8, True, bytes(1480))   # rewrites the UDP header+
    tail = frag4(GUEST, REMOTE, 17, 11, 1472, True, bytes(64))    # overlaps the last 8 bytes
    death = frag4(GUEST, REMOTE, 17, 11, 65528, False, bytes(16))  # ends past 65,535
    at_end = frag4(GUEST, REMOTE, 17, 11, 1480, False, bytes(64))
    assert V(c, [inside, tail, death, at_end]) == ["deny", "deny", "deny", "allow"]
    assert c.stats().fragments_bad == 3


def test_tcp_tiny_first_fragment_and_header_rewrite_rfc1858() -> None:
    c = Classifier(ALLOW_UDP)
    seg = build_frame(GUEST, REMOTE, "tcp", 40000, 80, bytes(3000), flags=0x02)
    tcp = seg[34:]
    # a first fragment too short for the TCP header (ports only): malformed, dropped;
    # the rest of its datagram has no record
    tiny = frag4(GUEST, REMOTE, 6, 21, 0, True, tcp[:8])
    rest = frag4(GUEST, REMOTE, 6, 21, 8, False, tcp[8:])
    assert V(c, [tiny, rest]) == ["malformed", "deny"]
    # a UDP first fragment of 4 bytes cannot hold the ports either
    assert V(c, [frag4(GUEST, REMOTE, 17, 22, 0, True, b"\x13\x88\x23")]) == ["malformed"]
    # a whole header in the first fragment, then offset 1 (8 bytes) rewriting the flags
    first = frag4(GUEST, REMOTE, 6, 23, 0, True, tcp[:24])
    rewrite = frag4(GUEST, REMOTE, 6, 23, 8, False, tcp[8:12] + tcp[12:14] + tcp[14:])
    later = frag4(GUEST, REMOTE, 6, 23, 24, False, tcp[24:])
    assert V(c, [first, rewrite, later]) == ["allow", "deny", "allow"]


def test_icmp_fragments_and_reply_fragments_from_the_uplink() -> None:
    c = Classifier(ALLOW_UDP)
    ping = build_frame(GUEST, REMOTE, "icmpv4", payload=bytes(3000))
    assert V(c, fragment4(ping, [1480, 1480], ident=31)) == ["allow"] * 3
    pong = build_frame(REMOTE, GUEST, "icmpv4", payload=bytes(3000), icmp_type=0)
    pf = fragment4(pong, [1480, 1480], ident=900)
    # from the uplink: later fragments before their first one, then in order
    assert [reply(c, f) for f in (pf[1], pf[0], pf[1], pf[2])] == [0, 1, 1, 1]
    # the UDP flow's large reply
    assert V(c, [build_frame(GUEST, REMOTE, "udp", 5000, 9000, b"q")]) == ["allow"]
    answer = fragment4(big_udp(REMOTE, GUEST, 9000, 5000, 4000), [1480, 1480], ident=901)
    assert [reply(c, f) for f in answer] == [1, 1, 1]
    # a reply fragment of a datagram whose first fragment was no reply
    stranger = fragment4(big_udp(OTHER, GUEST, 9000, 5000), [1480], ident=902)
    assert [reply(c, f) for f in stranger] == [0, 0]
    crafted = frag4(REMOTE, GUEST, 17, 903, 1480, False, bytes(100))
    assert reply(c, crafted) == 0
    tiny = frag4(REMOTE, GUEST, 17, 904, 0, True, b"\x23\x28")
    assert reply(c, tiny) == -1
    assert lib.ns_ctx_ingress_reply(c.handle, crafted, len(crafted), 1.0) == 0


def test_ipv6_fragments_follow_and_an_extension_header_after_the_fragment_header() -> None:
    c = Classifier(ALLOW_UDP)
    frags = fragment6(big_udp(GUEST6, REMOTE6), [1448, 1448], ident=0xDEADBEEF)
    assert V(c, frags) == ["allow"] * 3
    # destination options in the fragmentable part: the later fragments' Next Header is 60
    udp = big_udp(GUEST6, REMOTE6)[54:]
    dopts = b"\x11\x00" + bytes(6)  # next: UDP
    first = frag6(GUEST6, REMOTE6, 60, 5, 0, True, dopts + udp[:1440])
    later = frag6(GUEST6, REMOTE6, 60, 5, 1448, False, udp[1440:])
    assert V(c, [first, later]) == ["allow", "allow"]
    # an unfragmentable hop-by-hop header ahead of the fragment header is fine
    hbh = b"\x2c\x00" + bytes(6)
    first = frag6(GUEST6, REMOTE6, 17, 6, 0, True, udp[:1448], before=hbh, before_nxt=0)
    later = frag6(GUEST6, REMOTE6, 17, 6, 1448, False, udp[1448:], before=hbh, before_nxt=0)
    assert V(c, [first, later]) == ["allow", "allow"]
    # a second fragment header ahead of the later fragment's: no match
    outer = struct.pack("!BBHI", 44, 0, 0, 6)
    twice = frag6(GUEST6, REMOTE6, 17, 6, 1448, False, udp[1448:], before=outer, before_nxt=44)
    # a later fragment overlapping its first fragment
    overlap = frag6(GUEST6, REMOTE6, 17, 0xDEADBEEF, 8, False, bytes(64))
    stray = frag6(GUEST6, REMOTE6, 17, 77, 1448, False, bytes(64))
    assert V(c, [twice, overlap, stray]) == ["deny"] * 3
    # tiny IPv6 first fragments: the UDP header cut, or the header chain cut
    assert V(c, [frag6(GUEST6, REMOTE6, 17, 78, 0, True, udp[:4])]) == ["malformed"]
    assert V(c, [frag6(GUEST6, REMOTE6, 60, 79, 0, True, b"\x11\x00\x00")]) == ["malformed"]


def test_first_fragments_of_dns_and_of_a_pending_tls_flow() -> None:
    c = Classifier(NetworkPolicy.none())
    q = fragment4(build_frame(GUEST, "192.0.2.53", "udp", 5000, 53, bytes(2000)), [1480], 41)
    assert V(c, q) == ["to-dns", "to-dns"]
    pins = PinCache()
    pins.pin("example.com", ["192.0.2.9"], ttl=300, now=0.0)
    c = Classifier(NetworkPolicy.custom(rules=[Rule.allow(destination="example.com")]),
                   pins=pins)
    assert V(c, [build_frame(GUEST, "192.0.2.9", "tcp", 40000, 443, flags=0x02)]) == [
        "need-more"]
    # the start of a 16 KiB handshake record: the classifier waits for the rest of it
    start = b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc\x03\x03"
    hello = build_frame(GUEST, "192.0.2.9", "tcp", 40000, 443, start + bytes(1989), seq=1001)
    first, later = fragment4(hello, [1480], ident=42)
    # its bytes are not fed to a hello reassembled from fragments: the datagram is lost
    assert V(c, [first, later]) == ["need-more", "deny"]


def test_records_go_stale_with_a_recompile_and_expire() -> None:
    c = Classifier(ALLOW_UDP, fragment_lifetime=5)
    a = fragment4(big_udp(), [1480, 1480], ident=51)
    assert V(c, a[:1]) == ["allow"]
    c.recompile(ALLOW_UDP)
    assert V(c, a[1:2], now=1.1) == ["deny"]  # recorded under the old tables
    assert V(c, a[:2], now=1.2) == ["allow", "allow"]
    assert V(c, a[1:2], now=6.3) == ["deny"]  # 5 s after its first fragment
    b = fragment4(big_udp(), [1480, 1480], ident=52)
    assert V(c, b, now=10.0) == ["allow"] * 3
    # the last fragment passed: the record lingers 2 s (a reordered middle one), then goes
    assert V(c, b[1:2], now=11.5) == ["allow"]
    assert V(c, b[1:2], now=12.5) == ["deny"]
    c.expire(now=100.0)
    assert c.stats().fragments_live == 0


def test_the_table_is_bounded_and_keeps_working_under_a_flood() -> None:
    c = Classifier(ALLOW_UDP, max_fragments=16)
    flood = [fragment4(big_udp(n=1600), [1480], ident=i)[0] for i in range(2000)]
    assert set(V(c, flood)) == {"allow"}
    st = c.stats()
    assert st.fragments_live <= 16 and st.fragments_evicted >= 2000 - 16
    # the newest datagram's record is there; its later fragment passes
    last = fragment4(big_udp(n=1600), [1480], ident=1999)[1]
    assert V(c, [last]) == ["allow"]


def test_bad_fragment_settings_are_refused() -> None:
    for kw, msg in (({"max_fragments": 8}, "max_fragments must be an integer 16..1048576"),
                    ({"max_fragments": True}, "max_fragments"),
                    ({"max_fragments": 1 << 21}, "got 2097152"),
                    ({"fragment_lifetime": 0}, "fragment_lifetime must be a number"),
                    ({"fragment_lifetime": 7200}, "got 7200")):
        with pytest.raises(FastPathError, match=msg):
            Classifier(ALLOW_UDP, **kw)
