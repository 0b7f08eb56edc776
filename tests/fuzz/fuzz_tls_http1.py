"""atheris target: tls_proxy's HTTP/1 head parser, framing and secret scanner/substituter.

Run: ``python tests/fuzz/fuzz_tls_http1.py -max_total_time=60``. Only ``HttpError`` with a
4xx/5xx status is allowed; a substituted head must never contain an ineligible placeholder
that the scanner misses.
"""

from __future__ import annotations

import asyncio  # noqa: F401  (heavy deps imported first so only tls_proxy is instrumented)
import ssl  # noqa: F401
import sys

import atheris
import cryptography.x509  # noqa: F401
import filelock  # noqa: F401

with atheris.instrument_imports(include=["tls_proxy"]):
    from tls_proxy import Secret
    from tls_proxy._http1 import parse_head, request_framing
    from tls_proxy._secrets import Scanner, Substituter
    from tls_proxy.errors import HttpError

SUB = Substituter([Secret("A", "real-a", ["a.example"], inject=("headers", "basic_auth",
                                                                   "query", "body"))])
SCAN = Scanner([Secret("B", "real-b", ["b.example"])])


def TestOneInput(data: bytes) -> None:
    # half the inputs start from a valid request line so header parsing gets exercised
    if data[:1] in (b"\x00", b"\x01"):
        data = b"POST /p?q=$MSB_A HTTP/1.1\r\nHost: a.example\r\n" + data[1:].replace(b"\x00",
                                                                                  b"\r\n")
    try:
        head = parse_head(data + b"\r\n\r\n", request=True)
        request_framing(head)
    except HttpError as e:
        assert 400 <= e.status < 600
        return
    for _, v in head.headers:
        out = SUB.header_value(v, True)
        assert b"$MSB_A" not in out or b"$MSB_A" in v
    wire = head.serialize()
    if b"$MSB_B" in wire:
        assert SCAN.find(wire, "head") is not None


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
