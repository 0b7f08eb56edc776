#!/usr/bin/env python3
"""atheris target: the frame parser and the whole classify loop (flow table, SNI wait).

    python3 tests/fuzz/fuzz_frame.py -max_total_time=60

The input is split into length-prefixed frames (the stream wire format) and fed
to a classifier whose policy has CIDR, group, port and domain rules (so the
ClientHello reassembly path runs), and each frame also goes through
``parse_frame``.  Seeds for the fragment table (streams of first, later, overlapping,
stray and tiny IPv4/IPv6 fragments, from the guest and, as ingress, towards it) are
written into the output corpus directory (a scratch one by default).  Runs against the
ASan+UBSan build (see _netstack_asan.py).
"""

from __future__ import annotations

import os
import socket
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _netstack_asan import bootstrap, fuzz_args

atheris = bootstrap()

from netstack import (  # noqa: E402
    Classifier,
    MalformedFrame,
    NetworkPolicy,
    PinCache,
    Rule,
    parse_frame,
)

PINS = PinCache(max_bindings=64)
PINS.pin("example.com", ["192.0.2.9", "2001:db8::9"], ttl=1e6, now=0.0)
POLICY = NetworkPolicy(default_egress="deny", default_ingress="allow", rules=(
    Rule.deny(destination=".blocked.example"),
    Rule.allow(destination="example.com", protocol="tcp", port=443),
    Rule.allow(destination="192.0.2.0/24", protocol="udp", ports=[(1, 1000)]),
    Rule.allow(destination="192.0.2.0/24", protocol="icmpv4"),
    Rule.allow(destination="public", direction="any"),
    Rule.deny(destination="2001:db8::/32"),
))
CLASSIFIER = Classifier(POLICY, gateway=["10.0.2.2"], pins=PINS, max_flows=64, hello_cap=2048,
                        hello_budget=8192, intercept=["example.com"])
CLOCK = [0.0]


def TestOneInput(data: bytes) -> None:
    CLOCK[0] += 0.5
    try:
        parse_frame(data)
    except MalformedFrame:
        pass
    CLASSIFIER.classify([data], now=CLOCK[0])
    r = CLASSIFIER.classify_stream(data, now=CLOCK[0])
    assert r.consumed <= len(data)
    CLASSIFIER.classify_stream(data, direction="ingress", now=CLOCK[0])
    if CLOCK[0] % 50 == 0:
        CLASSIFIER.expire(now=CLOCK[0])


def _frag4(src: str, dst: str, proto: int, ident: int, off: int, more: bool,
           piece: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(piece), ident,
                     (0x2000 if more else 0) | off // 8, 64, proto, 0)
    return bytes(12) + b"\x08\x00" + ip + socket.inet_aton(src) + socket.inet_aton(dst) + piece


def _frag6(src: str, dst: str, nxt: int, ident: int, off: int, more: bool, piece: bytes,
           before: bytes = b"", first: int = 44) -> bytes:
    body = before + struct.pack("!BBHI", nxt, 0, off | int(more), ident) + piece
    ip = struct.pack("!IHBB", 6 << 28, len(body), first if before else 44, 64)
    return bytes(12) + b"\x86\xdd" + ip + socket.inet_pton(socket.AF_INET6, src) + \
        socket.inet_pton(socket.AF_INET6, dst) + body


def _stream(*frames: bytes) -> bytes:
    return b"".join(struct.pack("!I", len(f)) + f for f in frames)


def fragment_seeds() -> list[bytes]:
    """Streams of fragments: each input is also classified as one stream."""
    g, r, g6, r6 = "10.0.2.15", "192.0.2.9", "fd42:6d73:62::2", "2001:db8::9"
    udp = struct.pack("!HHHH", 5000, 500, 8 + 3000, 0) + bytes(3000)
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 1, 0, 5 << 4, 0x02, 65535, 0, 0) + bytes(2000)
    hbh = b"\x2c\x00" + bytes(6)
    return [
        _stream(_frag4(g, r, 17, 1, 0, True, udp[:1480]), _frag4(g, r, 17, 1, 1480, True,
                udp[1480:2960]), _frag4(g, r, 17, 1, 2960, False, udp[2960:])),
        _stream(_frag4(g, r, 17, 2, 1480, False, udp[1480:]),      # before its first
                _frag4(g, r, 17, 2, 0, True, udp[:1480]),
                _frag4(g, r, 17, 2, 8, False, udp[8:100]),         # overlapping
                _frag4(g, r, 17, 2, 65528, False, bytes(16))),     # past 65,535
        _stream(_frag4(g, r, 6, 3, 0, True, tcp[:8]),              # tiny first fragment
                _frag4(g, r, 6, 3, 8, False, tcp[8:]),
                _frag4(g, r, 6, 4, 0, True, tcp[:24]), _frag4(g, r, 6, 4, 24, False, tcp[24:])),
        _stream(_frag6(g6, r6, 17, 5, 0, True, udp[:1448]),
                _frag6(g6, r6, 17, 5, 1448, False, udp[1448:]),
                _frag6(g6, r6, 60, 6, 0, True, b"\x11\x00" + bytes(6) + udp[:1440]),
                _frag6(g6, r6, 60, 6, 1448, False, udp[1440:]),
                _frag6(g6, r6, 17, 7, 0, True, udp[:1448], before=hbh, first=0),
                _frag6(g6, r6, 17, 7, 1448, False, udp[1448:],
                       before=struct.pack("!BBHI", 44, 0, 0, 7), first=44)),
    ]


def _with_seeds(args: list[str]) -> list[str]:
    """Write the fragment seeds into the output corpus (the first directory argument: a
    scratch or caller-given directory, never the checked-in corpus)."""
    dirs = [a for a in args[1:] if not a.startswith("-")]
    corpus_root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    if dirs and os.path.isdir(dirs[0]) and \
            not os.path.abspath(dirs[0]).startswith(corpus_root + os.sep):
        for i, seed in enumerate(fragment_seeds()):
            with open(os.path.join(dirs[0], f"fragment-{i}"), "wb") as f:
                f.write(seed)
    return args


def main() -> None:
    atheris.Setup(_with_seeds(fuzz_args(sys.argv, "frame")), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
