"""Every secret violation gets an answer: ``403`` + JSON reason, promptly, or a closed
connection when a response can no longer be sent (it already started).

The upstream here never answers, never closes and ignores TLS close_notify, so a proxy
that waits for the upstream before answering would leave the client hanging until its
timeout. Real clients (httpx over HTTP/1.1 and HTTP/2, curl, raw sockets with the h2
state machine), explicit (CONNECT) and transparent mode, length / chunked bodies, the
buffered (body-scope substitution) and streamed paths, compressed bodies.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trustme

from tests.support import require_binaries
from tests.tls_proxy.conftest import NAMES, ProxyThread, make_config
from tests.tls_proxy.helpers import connect_tunnel
from tests.tls_proxy.stall_upstream import StallUpstream
from tls_proxy import TlsProxy

pytestmark = pytest.mark.timeout(90)
CLIENT_TIMEOUT = 15.0  # the proxy's own timeouts are longer (idle 300 s, TLS shutdown 30 s)
LEAK = b'{"k": "$MSB_API_KEY", "pad": "' + b"x" * 200 + b'"}'


@pytest.fixture(scope="module", params=[False, True], ids=["h1-upstream", "h2-upstream"])
def stall(request: pytest.FixtureRequest, upstream_ca: trustme.CA) -> Iterator[StallUpstream]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    upstream_ca.issue_cert(*NAMES).configure_cert(ctx)
    u = StallUpstream(ctx, h2_enabled=request.param)
    yield u
    u.close()


class TransparentThread:
    """A TlsProxy in transparent mode (lookup callback) in its own event loop thread."""

    def __init__(self, proxy: TlsProxy, dst: tuple[str, int]) -> None:
        self.proxy = proxy
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            _, self.port = self.loop.run_until_complete(
                proxy.listen_transparent("127.0.0.1", 0, lambda peer, local: dst))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Via:
    """How a client reaches ``host`` through the proxy under test."""

    mode: str
    proxy_port: int
    upstream_port: int
    ca_cert: str

    def url(self, host: str, path: str) -> str:
        port = self.upstream_port if self.mode == "explicit" else self.proxy_port
        return f"https://{host}:{port}{path}"

    def client(self, http2: bool = False) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=self.ca_cert)
        if self.mode == "explicit":
                return httpx.Client(proxy=f"http://127.0.0.1:{self.proxy_port}", verify=ctx,
                                trust_env=False, http2=http2, timeout=CLIENT_TIMEOUT)
        # transparent: connect to the listener, the name only in SNI and Host
        return httpx.Client(verify=ctx, trust_env=False, http2=http2, timeout=CLIENT_TIMEOUT)

    def post(self, host: str, path: str, content: Any, headers: dict[str, str] | None = None,
             http2: bool = False) -> httpx.Response:
        with self.client(http2) as c:
            if self.mode == "explicit":
                return c.post(self.url(host, path), content=content, headers=headers)
            return c.post(f"https://127.0.0.1:{self.proxy_port}{path}", content=content,
                          headers={"Host": host, **(headers or {})},
                          extensions={"sni_hostname": host})

    def tls_socket(self, host: str, alpn: list[str] | None = None) -> ssl.SSLSocket:
        ctx = ssl.create_default_context(cafile=self.ca_cert)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        if self.mode == "explicit":
            raw = connect_tunnel(self.proxy_port, host, self.upstream_port, CLIENT_TIMEOUT)
        else:
            raw = socket.create_connection(("127.0.0.1", self.proxy_port), CLIENT_TIMEOUT)
        return ctx.wrap_socket(raw, server_hostname=host)


@pytest.fixture(scope="module", params=["explicit", "transparent"])
def via(request: pytest.FixtureRequest, stall: StallUpstream, proxy_ca_dir: Any,
        upstream_ca_pem: str, ca_cert: str) -> Iterator[Via]:
    cfg = make_config(proxy_ca_dir, upstream_ca_pem)
    if request.param == "explicit":
        pt = ProxyThread(cfg)
        yield Via("explicit", pt.port, stall.port, ca_cert)
        pt.stop()
    else:
        tt = TransparentThread(TlsProxy(cfg), ("127.0.0.1", stall.port))
        yield Via("transparent", tt.port, stall.port, ca_cert)
        tt.stop()


def _assert_blocked(r: httpx.Response, where: str = "") -> None:
    assert r.status_code == 403, r.text
    assert r.headers["content-type"] == "application/json"
    j = r.json()
    assert j["error"] == "secret_policy_denied"
    assert "API_KEY" in j["reason"] and where in j["reason"]
    assert "real-api-key" not in r.text


def _chunks(data: bytes, n: int = 3) -> Iterator[bytes]:
    step = max(1, len(data) // n)
    for i in range(0, len(data), step):
        yield data[i:i + step]


# host "other" has no secrets at all (streamed path); host "q" has a body-scope secret of
# its own, so its bodies are buffered for substitution (buffered path)
BODIES = {
    "length-streamed": ("other.example.test", lambda: LEAK, {}, "body"),
    "chunked-streamed": ("other.example.test", lambda: _chunks(LEAK), {}, "body"),
    "length-buffered": ("q.example.test", lambda: LEAK, {}, "body"),
    "chunked-buffered": ("q.example.test", lambda: _chunks(LEAK), {}, "body"),
    "big-streamed": ("other.example.test", lambda: b"y" * (1 << 20) + LEAK, {}, "body"),
    # the leak first, then much more: the client is still sending when the answer goes out
    "leak-then-more": ("other.example.test", lambda: LEAK + b"z" * (4 << 20), {}, "body"),
    "gzip-streamed": ("other.example.test", lambda: gzip.compress(LEAK),
                      {"Content-Encoding": "gzip"}, "decompressed"),
    "gzip-chunked": ("q.example.test", lambda: _chunks(gzip.compress(LEAK)),
                     {"Content-Encoding": "gzip"}, "decompressed"),
}


@pytest.mark.parametrize("case", sorted(BODIES))
def test_body_violation_answered_http1(via: Via, case: str) -> None:
    host, body, headers, where = BODIES[case]
    r = via.post(host, "/e", body(), {"Content-Type": "application/json", **headers})
    assert r.http_version == "HTTP/1.1"
    _assert_blocked(r, where)


@pytest.mark.parametrize("case", ["length-streamed", "gzip-streamed", "big-streamed",
                                  "leak-then-more"])
def test_body_violation_answered_http2(via: Via, stall: StallUpstream, case: str) -> None:
    host, body, headers, where = BODIES[case]
    r = via.post(host, "/e", body(), headers, http2=True)
    # h2 end to end when the upstream speaks it; otherwise the proxy offers HTTP/1.1
    assert r.http_version == ("HTTP/2" if stall.h2 else "HTTP/1.1")
    _assert_blocked(r, where)


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
def test_header_violation_answered(via: Via, http2: bool) -> None:
    with via.client(http2) as c:
        if via.mode == "explicit":
            r = c.get(via.url("other.example.test", "/e"), headers={"X": "$MSB_API_KEY"})
        else:
            r = c.get(f"https://127.0.0.1:{via.proxy_port}/e",
                      headers={"Host": "other.example.test", "X": "$MSB_API_KEY"},
                      extensions={"sni_hostname": "other.example.test"})
    _assert_blocked(r, "head")


def test_curl_chunked_body_violation(via: Via) -> None:
    require_binaries("curl")
    if via.mode == "explicit":
        net = ["--proxy", f"http://127.0.0.1:{via.proxy_port}"]
    else:
        net = ["--resolve", f"other.example.test:{via.proxy_port}:127.0.0.1"]
    out = subprocess.run(
        ["curl", "-sS", "--http1.1", "--max-time", str(CLIENT_TIMEOUT), *net,
         "--cacert", via.ca_cert, "-H", "Transfer-Encoding: chunked",
         "--data-binary", LEAK.decode(), "-w", "\n%{http_code}",
         via.url("other.example.test", "/e")],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT + 10)
    body, _, code = out.stdout.rpartition("\n")
    assert code == "403", out.stderr
    assert json.loads(body)["error"] == "secret_policy_denied"


def _recv_until_closed(s: ssl.SSLSocket) -> bytes:
    got = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                return got
            got += d
    except (ConnectionError, ssl.SSLError):
        return got
    # a socket.timeout (TimeoutError) propagates: the proxy did not close


def test_violation_after_response_started_closes(via: Via, stall: StallUpstream) -> None:
    """The upstream answered (status line relayed) before the leaking body arrived: no
    403 can follow a started response, so HTTP/1.1 closes the connection and HTTP/2
    resets the stream, promptly (a recv timeout here is the failure)."""
    if stall.h2:
        _h2_early(via)
    else:
        _h1_early(via)


def _h1_early(via: Via) -> None:
    with via.tls_socket("other.example.test") as s:
        s.sendall(b"POST /early HTTP/1.1\r\nHost: other.example.test\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(LEAK))
        got = b""
        while b"\r\n\r\n" not in got:
            d = s.recv(65536)
            assert d, got
            got += d
        assert got.startswith(b"HTTP/1.1 200"), got  # the response has started...
        s.sendall(LEAK)  # ...when the leak arrives: nothing more can be said but goodbye
        rest = _recv_until_closed(s)
    assert b"403" not in rest and len(got + rest) < 1000


def _h2_early(via: Via) -> None:
    with via.tls_socket("other.example.test", ["h2"]) as s:
        assert s.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", "/early"), (":scheme", "https"),
                              (":authority", "other.example.test")])
        s.sendall(conn.data_to_send())
        events: list[Any] = []
        while not any(isinstance(e, h2.events.ResponseReceived) for e in events):
            d = s.recv(65536)
            assert d, events
            events += conn.receive_data(d)
            s.sendall(conn.data_to_send())
        conn.send_data(1, LEAK, end_stream=True)
        s.sendall(conn.data_to_send())
        while not any(isinstance(e, h2.events.StreamReset | h2.events.ConnectionTerminated)
                      for e in events):
            d = s.recv(65536)
            assert d, events
            events += conn.receive_data(d)
        assert not any(isinstance(e, h2.events.StreamEnded) for e in events)
