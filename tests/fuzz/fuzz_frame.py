#!/usr/bin/env python3
"""atheris target: the frame parser and the whole classify loop (flow table, SNI wait).

    python3 tests/fuzz/fuzz_frame.py -max_total_time=60

The input is split into length-prefixed frames (the stream wire format) and fed
to a classifier whose policy has CIDR, group, port and domain rules (so the
ClientHello reassembly path runs), and each frame also goes through
``parse_frame``.  Runs against the ASan+UBSan build (see _netstack_asan.py).
"""

from __future__ import annotations

import os
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


def main() -> None:
    atheris.Setup(fuzz_args(sys.argv, "frame"), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
