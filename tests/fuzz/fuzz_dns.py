#!/usr/bin/env python3
"""atheris target: the DNS response parser and the pin cache it feeds.

    python3 tests/fuzz/fuzz_dns.py -max_total_time=60

Runs against the ASan+UBSan build (see _netstack_asan.py).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _netstack_asan import bootstrap, fuzz_args

atheris = bootstrap()

from netstack import MalformedDNS, PinCache, parse_dns_response  # noqa: E402

PINS = PinCache(max_bindings=32, ttl_ceiling=30)
CLOCK = [0.0]


def TestOneInput(data: bytes) -> None:
    CLOCK[0] += 0.25
    try:
        r = parse_dns_response(data)
    except MalformedDNS:
        r = None
    try:
        PINS.learn(data, now=CLOCK[0])
    except MalformedDNS:
        assert r is None
    if r is not None:
        for ip, _ttl in r.addresses:
            PINS.names(ip, now=CLOCK[0])
    if CLOCK[0] % 20 == 0:
        PINS.expire(now=CLOCK[0])


def main() -> None:
    atheris.Setup(fuzz_args(sys.argv, "dns"), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
