"""Hostile clients get a clean close or a 4xx, never a hang or a crash."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from tests.tls_proxy.helpers import connect_tunnel, read_response, tls_tunnel

pytestmark = pytest.mark.timeout(60)


def _closed_within(s: socket.socket, seconds: float) -> bytes:
    """Read until EOF; fail if the peer keeps the connection open longer than ``seconds``."""
    s.settimeout(seconds)
    data = b""
    t0 = time.monotonic()
    while True:
        try:
            d = s.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            pytest.fail(f"connection still open after {time.monotonic() - t0:.1f}s")
        if not d:
            return data
        data += d


def test_garbage_instead_of_client_hello(proxy, upstream):
    s = connect_tunnel(proxy.port, "api.example.test", upstream.port)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
    assert _closed_within(s, 5) == b""
    s.close()


def test_random_bytes_with_tls_record_header(proxy, upstream):
    s = connect_tunnel(proxy.port, "api.example.test", upstream.port)
    s.sendall(b"\x16\x03\x01\x00\x30" + b"\x01\x00\x00\x2c" + b"\xff" * 44)
    assert _closed_within(s, 5) == b""
    s.close()


def test_hello_without_sni_is_closed(proxy, upstream):
    raw = connect_tunnel(proxy.port, "api.example.test", upstream.port)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        ctx.wrap_socket(raw, server_hostname=None)  # Python sends no SNI without a name
    raw.close()


def test_sni_differs_from_connect_host(proxy, upstream, ca_cert):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_tunnel(proxy.port, "api.example.test", upstream.port, ca_cert,
                   sni="other.example.test")


def test_slowloris_before_hello_times_out(proxy, upstream):
    s = connect_tunnel(proxy.port, "api.example.test", upstream.port)
    s.sendall(b"\x16\x03")  # then nothing: handshake_timeout is 2 s in these tests
    t0 = time.monotonic()
    assert _closed_within(s, 8) == b""
    assert time.monotonic() - t0 < 8
    s.close()


def test_slowloris_request_head_gets_408(proxy, upstream, ca_cert):
    s = tls_tunnel(proxy.port, "api.example.test", upstream.port, ca_cert)
    s.sendall(b"GET /e HTTP/1.1\r\nHost: api.exa")
    t0 = time.monotonic()
    data = _closed_within(s, 8)
    assert data.startswith(b"HTTP/1.1 408"), data[:60]
    assert time.monotonic() - t0 < 8
    s.close()


def test_slowloris_connect_head(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(b"CONNECT api.example.test:443 HTTP/1.1\r\nHo")
    assert _closed_within(s, 8).startswith(b"HTTP/1.1 408")
    s.close()


def test_oversized_headers_431(proxy, upstream, ca_cert):
    s = tls_tunnel(proxy.port, "api.example.test", upstream.port, ca_cert)
    s.sendall(b"GET /e HTTP/1.1\r\nHost: api.example.test\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
    st, _, body = read_response(s, bytearray())
    assert st == 431 and b"larger than" in body
    s.close()


def test_oversized_connect_head(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(b"CONNECT a:443 HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")
    assert _closed_within(s, 5).startswith(b"HTTP/1.1 431")
    s.close()


@pytest.mark.parametrize(
    "req,status",
    [
        (b"GET /e HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 3\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET /e HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 3\r\n"
         b"Content-Length: 4\r\n\r\nabcd", 400),
        (b"GET /e HTTP/1.1\r\nHost: api.example.test\r\n folded\r\n\r\n", 400),
        (b"GET /e HTTP/1.1\r\nHost : api.example.test\r\n\r\n", 400),
        (b"GET /e HTTP/1.1\r\n\r\n", 400),
        (b"GET /e HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /e HTTP/2.0\r\nHost: api.example.test\r\n\r\n", 505),
        (b"GET /e HTTP/1.1\r\nHost: api.example.test\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GARBAGE\r\n\r\n", 400),
    ],
)
def test_malformed_requests_get_4xx(proxy, upstream, ca_cert, req, status):
    s = tls_tunnel(proxy.port, "api.example.test", upstream.port, ca_cert)
    s.sendall(req)
    st, _, _ = read_response(s, bytearray())
    assert st == status
    s.close()


def test_non_connect_method_refused(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(b"GET http://api.example.test/?k=$MSB_API_KEY HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
    assert _closed_within(s, 5).startswith(b"HTTP/1.1 501")
    s.close()


def test_bad_connect_authority(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(b"CONNECT no-port HTTP/1.1\r\n\r\n")
    assert _closed_within(s, 5).startswith(b"HTTP/1.1 400")
    s.close()


def test_proxy_still_serves_after_abuse(proxy, upstream, ca_cert):
    s = tls_tunnel(proxy.port, "api.example.test", upstream.port, ca_cert)
    s.sendall(b"GET /ok HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
    st, _, _ = read_response(s, bytearray())
    assert st == 200
    s.close()


def test_slow_body_times_out_with_408(proxy_ca_dir, upstream_ca_pem, upstream, ca_cert):
    from tests.tls_proxy.conftest import ProxyThread, make_config

    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem, idle_timeout=1.0))
    try:
        s = tls_tunnel(pt.port, "api.example.test", upstream.port, ca_cert)
        s.sendall(b"POST /e HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 100\r\n\r\n"
                  b"0123456789")
        t0 = time.monotonic()
        data = _closed_within(s, 8)
        assert data.startswith(b"HTTP/1.1 408"), data[:80]
        assert time.monotonic() - t0 < 6
        s.close()
    finally:
        pt.stop()


def test_connection_limit(proxy_ca_dir, upstream_ca_pem, upstream):
    from tests.tls_proxy.conftest import ProxyThread, make_config

    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem, max_connections=2))
    try:
        held = [connect_tunnel(pt.port, "api.example.test", upstream.port) for _ in range(2)]
        extra = socket.create_connection(("127.0.0.1", pt.port))
        extra.sendall(b"CONNECT api.example.test:1 HTTP/1.1\r\n\r\n")
        assert _closed_within(extra, 5) == b""
        for h in held:
            h.close()
        extra.close()
    finally:
        pt.stop()
