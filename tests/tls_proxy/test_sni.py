"""The pure-Python ClientHello reader against real hellos and hostile bytes."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tls_proxy import ClientHelloError, parse_client_hello


def real_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    a, b = socket.socketpair()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)

    def go() -> None:
        try:
            ctx.wrap_socket(a, server_hostname=sni)
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=go)
    t.start()
    b.settimeout(5)
    data = b.recv(65536)
    b.close()
    a.close()
    t.join()
    return data


def test_real_hello_sni_and_alpn():
    h = parse_client_hello(real_hello("API.Example.com", ["h2", "http/1.1"]))
    assert h is not None and h.sni == "api.example.com" and h.alpn == ("h2", "http/1.1")


def test_real_hello_without_sni():
    h = parse_client_hello(real_hello(None))
    assert h is not None and h.sni is None


def test_incomplete_prefixes_ask_for_more():
    data = real_hello("a.example")
    for n in (1, 4, 5, 9, len(data) // 2, len(data) - 1):
        assert parse_client_hello(data[:n]) is None


def test_hello_split_across_records():
    data = real_hello("split.example")
    body = data[5:]
    recs = b""
    for i in range(0, len(body), 50):
        part = body[i : i + 50]
        recs += b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part
    h = parse_client_hello(recs)
    assert h is not None and h.sni == "split.example"


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n",
    b"\x16\x02\x00\x00\x10" + b"\x00" * 16,
    b"\x16\x03\x01\x00\x00",
    b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
    b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",
])
def test_garbage_raises_typed_error(data):
    with pytest.raises(ClientHelloError):
        parse_client_hello(data)


@given(st.binary(max_size=2048))
def test_random_bytes_never_crash(data):
    try:
        parse_client_hello(data)
    except ClientHelloError:
        pass


@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_mutated_real_hello_never_crash(pos, junk):
    data = bytearray(_HELLO)
    p = pos % len(data)
    data[p : p + len(junk)] = junk
    try:
        parse_client_hello(bytes(data))
    except ClientHelloError:
        pass


_HELLO = real_hello("mutate.example", ["http/1.1"])
