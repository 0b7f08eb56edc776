#!/usr/bin/env python3
"""atheris target: the TLS ClientHello parser (records, extensions, SNI, ALPN, caps).

    python3 tests/fuzz/fuzz_client_hello.py -max_total_time=60

Every prefix length the fuzzer picks is parsed too, so the reassembly
(NEED_MORE) paths are covered.  Runs against the ASan+UBSan build.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _netstack_asan import bootstrap, fuzz_args

atheris = bootstrap()

from netstack import MalformedHello, parse_client_hello  # noqa: E402


def TestOneInput(data: bytes) -> None:
    for cap in (64, 512, 16384):
        try:
            info = parse_client_hello(data, cap=cap)
        except MalformedHello:
            continue
        if info.complete:
            assert info.length <= len(data)
            if info.sni is not None:
                assert info.sni == info.sni.lower() and not info.sni.endswith(".")
    if len(data) > 2:
        try:
            parse_client_hello(data[: len(data) // 2])
        except MalformedHello:
            pass


def main() -> None:
    atheris.Setup(fuzz_args(sys.argv, "client_hello"), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
