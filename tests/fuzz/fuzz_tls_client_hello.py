"""atheris target: tls_proxy's pure-Python ClientHello reader.

Run: ``python tests/fuzz/fuzz_tls_client_hello.py -max_total_time=60 [corpus_dir]``.
Only ``ClientHelloError`` or a result/None are allowed; anything else is a finding.
"""

from __future__ import annotations

import asyncio  # noqa: F401  (heavy deps imported first so only tls_proxy is instrumented)
import ssl  # noqa: F401
import sys

import atheris
import cryptography.x509  # noqa: F401
import filelock  # noqa: F401

with atheris.instrument_imports(include=["tls_proxy"]):
    from tls_proxy import parse_client_hello
    from tls_proxy.errors import ClientHelloError


def TestOneInput(data: bytes) -> None:
    # also exercise the "looks like TLS" path: prefix a handshake record header half the time
    if data[:1] == b"\x00":
        body = data[1:]
        data = b"\x16\x03\x01" + len(body).to_bytes(2, "big")[-2:] + body
    try:
        h = parse_client_hello(data)
    except ClientHelloError:
        return
    if h is not None and h.sni is not None:
        assert h.sni == h.sni.lower()


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
