"""ClientHello parser: real hellos (Python ssl, openssl s_client), splits, records, caps."""

from __future__ import annotations

import random

import pytest

from netstack import (
    Classifier,
    MalformedHello,
    NetworkPolicy,
    Rule,
    Verdict,
    build_frame,
    parse_client_hello,
)
from tests.support import require_binaries

from ._tls import add_extension, handshake_bytes, openssl_hello, python_hello, records

LONG_SNI = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 57])  # 249 characters


def test_python_ssl_hello() -> None:
    h = python_hello("API.Example.com", ["h2", "http/1.1"])
    info = parse_client_hello(h)
    assert info == info.__class__(True, "api.example.com", ("h2", "http/1.1"), False, len(h))


def test_long_sni_and_many_alpn() -> None:
    alpn = [f"proto-{i}" for i in range(40)]
    h = python_hello(LONG_SNI, alpn)
    info = parse_client_hello(h)
    assert info.sni == LONG_SNI
    assert info.alpn == tuple(alpn[:16])  # the first 16 are reported


def test_no_sni() -> None:
    info = parse_client_hello(python_hello(None))
    assert info.complete and info.sni is None


def test_every_prefix_of_a_hello_needs_more() -> None:
    h = python_hello("www.example.org", ["http/1.1"])
    for cut in range(len(h)):
        assert not parse_client_hello(h[:cut]).complete, cut
    assert parse_client_hello(h).sni == "www.example.org"
    assert parse_client_hello(h + b"\x17\x03\x03").sni == "www.example.org"


@pytest.mark.parametrize("size", [1, 2, 7, 100, 511])
def test_hello_split_across_records(size: int) -> None:
    h = python_hello("split.example.net", ["h2"])
    multi = records(handshake_bytes(h), size)
    info = parse_client_hello(multi)
    assert (info.complete, info.sni, info.alpn) == (True, "split.example.net", ("h2",))
    for cut in range(0, len(multi), max(1, len(multi) // 97)):
        assert not parse_client_hello(multi[:cut]).complete


def test_post_quantum_sized_hello_with_padding_and_ech() -> None:
    h = python_hello("pq.example.com", ["h2"])
    big = add_extension(h, 0x11EC, bytes(1216))        # an X25519MLKEM768-sized blob
    big = add_extension(big, 0x0015, bytes(40))        # padding
    assert 1700 < len(big) < 2000
    info = parse_client_hello(big)
    assert info.sni == "pq.example.com" and not info.ech
    ech = add_extension(big, 0xFE0D, b"\x00" * 90)
    assert parse_client_hello(ech).ech


def test_openssl_s_client_hellos() -> None:
    require_binaries("openssl")
    h = openssl_hello("s-client.example.com", ["-alpn", "h2,http/1.1"])
    info = parse_client_hello(h)
    assert (info.sni, info.alpn) == ("s-client.example.com", ("h2", "http/1.1"))
    h13 = openssl_hello(LONG_SNI, ["-tls1_3"])
    assert parse_client_hello(h13).sni == LONG_SNI


def test_split_at_every_byte_boundary_in_two_tcp_segments() -> None:
    """The classifier reassembles a hello cut anywhere into two TCP segments."""
    h = add_extension(python_hello("two.example.com", ["h2"]), 0x11EC, bytes(1216))
    policy = NetworkPolicy(default_egress="allow", default_ingress="allow",
                           rules=(Rule.deny(destination="two.example.com", protocol="tcp"),))
    c = Classifier(policy, max_flows=4096)
    for cut in range(1, len(h)):
        sport = 1024 + cut
        frames = [
            build_frame("10.0.2.15", "203.0.113.7", "tcp", sport, 443, flags=0x02, seq=999),
            build_frame("10.0.2.15", "203.0.113.7", "tcp", sport, 443, h[:cut], seq=1000),
            build_frame("10.0.2.15", "203.0.113.7", "tcp", sport, 443, h[cut:], seq=1000 + cut),
        ]
        got = [Verdict(v) for v in c.classify(frames, now=0.0)]
        assert got == [Verdict.NEED_MORE, Verdict.NEED_MORE, Verdict.DENY_RST], cut


def test_malformed_hellos_raise() -> None:
    h = python_hello("bad.example.com")
    with pytest.raises(MalformedHello, match="not a TLS"):
        parse_client_hello(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(MalformedHello, match="not a TLS"):
        parse_client_hello(b"\x16\x02")
    with pytest.raises(MalformedHello, match="malformed"):
        parse_client_hello(h[:5] + b"\x02" + h[6:])           # ServerHello type
    dup = add_extension(h, 0x0000, h[:0] + b"\x00\x06\x00\x00\x03abc")
    with pytest.raises(MalformedHello, match="malformed"):
        parse_client_hello(dup)                              # two SNI extensions
    with pytest.raises(MalformedHello, match="cap"):
        parse_client_hello(add_extension(h, 0x11EC, bytes(3000)), cap=1024)
    bad_name = add_extension(python_hello(None), 0x0000, b"\x00\x06\x00\x00\x03a\x00c")
    with pytest.raises(MalformedHello):
        parse_client_hello(bad_name)
    with pytest.raises(MalformedHello, match="cap must be"):
        parse_client_hello(h, cap=10)


def test_random_corruption_never_crashes() -> None:
    rng = random.Random(11)
    base = python_hello("fuzz.example.com", ["h2", "http/1.1"])
    for _ in range(3000):
        b = bytearray(base)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cut = rng.randrange(len(b) + 1)
        try:
            parse_client_hello(bytes(b[:cut]))
        except MalformedHello:
            pass
