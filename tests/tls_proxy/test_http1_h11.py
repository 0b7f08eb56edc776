"""Our HTTP/1 parser (tls_proxy._http1) cross-checked against h11 on the same byte streams.

Each case is one request (or response) as it arrives on the wire. Both parsers read
it; their views are compared: start line, headers (framing headers aside), body
framing and the body itself. Where both accept, the views must be equal. Where h11
refuses, we must refuse too (never laxer than the reference), except for the few
responses listed as ``laxer`` (RFC 9112 lets a response's framing fall back to
"until close"; the proxy relays what upstream sent). Where we refuse and h11 accepts,
the case must be marked ``stricter`` with the reason (request smuggling, obs-fold, ...).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11
import pytest

from tls_proxy._http1 import iter_chunked, read_head, request_framing, response_framing
from tls_proxy._streams import BufferedReader
from tls_proxy.errors import HttpError

View = tuple[object, ...]
_FRAMING_HEADERS = {b"content-length", b"transfer-encoding"}


class _Bytes:
    """A :class:`tls_proxy._streams.Source` over fixed bytes, delivered in small pieces."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        self.parts = [data[i:i + piece] for i in range(0, len(data), piece)]

    async def recv(self) -> bytes:
        return self.parts.pop(0) if self.parts else b""


def _ours(data: bytes, *, request: bool, method: bytes = b"GET", head_only: bool = False) -> View:
    """(start line, headers, framing kind, body) as tls_proxy._http1 sees ``data``."""

    async def run() -> View:
        r = BufferedReader(_Bytes(data))
        head = await read_head(r, request=request)
        assert head is not None
        if request:
            kind, n = request_framing(head)
            start: View = (head.method, head.target, head.version)
        else:
            kind, n = response_framing(head, method)
            start = (head.status, head.method, head.version)  # status, version, reason
        if head_only:
            body = b""
        elif kind == "length":
            body = await r.read_exact(n)
            if len(body) != n:
                raise HttpError(400, "short body")
        elif kind == "chunked":
            body = b"".join([p async for p in iter_chunked(r)])
        elif kind == "close":
            body = bytes(r.buf) + b"".join(await _rest(r))
        else:
            body = b""
        headers = tuple((k.lower(), v) for k, v in head.headers
                        if k.lower() not in _FRAMING_HEADERS)
        return (*start, headers, "length" if kind in ("length", "none") else kind, body)

    return asyncio.run(run())


async def _rest(r: BufferedReader) -> list[bytes]:
    out = []
    while data := await r.src.recv():
        out.append(data)
    return out


def _h11(data: bytes, *, request: bool, method: bytes = b"GET", head_only: bool = False) -> View:
    """The same view from h11 (raises h11.ProtocolError where h11 refuses)."""
    if request:
        conn = h11.Connection(h11.SERVER)
    else:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
        conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    if not head_only:
        conn.receive_data(b"")  # the whole stream has arrived (EOF)
    head = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if head is not None and head_only:
                break
            raise h11.RemoteProtocolError("incomplete message", 400)
        if event is h11.PAUSED:  # a protocol switch (CONNECT 2xx): no body
            break
        if isinstance(event, h11.InformationalResponse) and head is None:
            return (event.status_code, b"HTTP/" + event.http_version, event.reason,
                    tuple((k.lower(), v) for k, v in event.headers.raw_items()), "length", b"")
        if isinstance(event, (h11.Request, h11.Response)):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    assert head is not None
    te = [v for k, v in head.headers.raw_items() if k.lower() == b"transfer-encoding"]
    kind = "chunked" if te else "length"
    if not request and not te and not any(k.lower() == b"content-length"
                                          for k, _ in head.headers.raw_items()):
        status = head.status_code  # type: ignore[union-attr]
        if not (status in (204, 304) or method == b"HEAD"
                or (method == b"CONNECT" and 200 <= status < 300)):
            kind = "close"
    headers = tuple((k.lower(), v) for k, v in head.headers.raw_items()
                    if k.lower() not in _FRAMING_HEADERS)
    version = b"HTTP/" + head.http_version
    if request:
        assert isinstance(head, h11.Request)
        return (head.method, head.target, version, headers, kind, body)
    assert isinstance(head, h11.Response)
    return (head.status_code, version, head.reason, headers, kind, body)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    request: bool = True
    method: bytes = b"GET"
    head_only: bool = False  # compare heads and framing only (the body is not there)
    stricter: str = ""  # we refuse, h11 accepts: why
    laxer: str = ""  # we accept, h11 refuses: why (responses only)


def req(name: str, data: bytes, **kw: str | bool) -> Case:
    return Case(name, data, True, b"GET", **kw)  # type: ignore[arg-type]


def resp(name: str, data: bytes, method: bytes = b"GET", **kw: str) -> Case:
    return Case(name, data, False, method, **kw)


H = b"Host: a.test\r\n"
CASES = [
    # -- requests both parsers accept ---------------------------------------------------
    req("get", b"GET / HTTP/1.1\r\n" + H + b"\r\n"),
    req("http10", b"GET /x HTTP/1.0\r\n\r\n"),
    req("absolute-form", b"GET http://a.test/p?q=1 HTTP/1.1\r\n" + H + b"\r\n"),
    req("lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n"),
    req("length", b"POST /u HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello"),
    req("length-zero", b"POST /u HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n"),
    req("length-list", b"POST /u HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc"),
    req("length-repeated", b"POST /u HTTP/1.1\r\n" + H
        + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
    req("chunked", b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"),
    req("chunked-upper-hex", b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: Chunked\r\n\r\n"
        b"A\r\n0123456789\r\n0\r\n\r\n"),
    req("ows-around-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: \t padded \t\r\n\r\n"),
    req("tab-inside-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\tb\r\n\r\n"),
    req("empty-value", b"GET / HTTP/1.1\r\n" + H + b"X-Empty:\r\n\r\n"),
    req("header-order-and-case", b"GET / HTTP/1.1\r\nhOsT: a.test\r\nX-B: 2\r\nX-A: 1\r\n"
        b"x-b: 3\r\n\r\n"),
    req("obs-text-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: caf\xc3\xa9\r\n\r\n"),
    # -- requests both refuse -----------------------------------------------------------
    req("space-before-colon", b"GET / HTTP/1.1\r\nHost : a.test\r\n\r\n"),
    req("bad-header-name", b"GET / HTTP/1.1\r\n" + H + b"X(A): 1\r\n\r\n"),
    req("no-colon", b"GET / HTTP/1.1\r\n" + H + b"garbage\r\n\r\n"),
    req("nul-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n"),
    req("cr-in-value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n"),
    req("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n"),
    req("two-spaces", b"GET  / HTTP/1.1\r\n" + H + b"\r\n"),
    req("no-version", b"GET /\r\n" + H + b"\r\n"),
    req("conflicting-lengths", b"POST /u HTTP/1.1\r\n" + H
        + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
    req("length-list-conflict", b"POST /u HTTP/1.1\r\n" + H + b"Content-Length: 3, 4\r\n\r\nabcd"),
    req("negative-length", b"POST /u HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n"),
    req("hex-length", b"POST /u HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n\r\nhello"),
    req("te-gzip", b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n"),
    req("te-gzip-chunked", b"POST /u HTTP/1.1\r\n" + H
        + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    req("bad-chunk-size", b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n"),
    req("chunk-without-crlf", b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhelloXX0\r\n\r\n"),
    req("short-body", b"POST /u HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nhello"),
    req("truncated-chunked", b"POST /u HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhel"),
    # -- requests we refuse on purpose --------------------------------------------------
    req("te-and-length", b"POST /u HTTP/1.1\r\n" + H
        + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        stricter="Transfer-Encoding with Content-Length is the classic smuggling vector"),
    req("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n two\r\n\r\n",
        stricter="obs-fold is deprecated (RFC 9112 5.2); a proxy may reject it"),
    req("bare-lf", b"GET / HTTP/1.1\n" + H.replace(b"\r\n", b"\n") + b"\n",
        stricter="lines end in CRLF; bare LF is a parser-differential risk"),
    req("length-16-digits", b"POST /u HTTP/1.1\r\n" + H
        + b"Content-Length: 1000000000000000\r\n\r\n", head_only=True,
        stricter="at most 15 digits: no body that large is relayed"),
    req("http09-version", b"GET / HTTP/0.9\r\n" + H + b"\r\n",
        stricter="HTTP/1.0 and 1.1 only (505)"),
    req("http12-version", b"GET / HTTP/1.2\r\n" + H + b"\r\n",
        stricter="HTTP/1.0 and 1.1 only (505)"),
    # -- responses ----------------------------------------------------------------------
    resp("ok-length", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nhi"),
    resp("ok-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"2\r\nhi\r\n0\r\n\r\n"),
    resp("until-close", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nall of the rest"),
    resp("http10-until-close", b"HTTP/1.0 200 OK\r\n\r\nrest"),
    resp("no-reason", b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n"),
    resp("no-content", b"HTTP/1.1 204 No Content\r\n\r\n"),
    resp("not-modified-with-length", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"),
    resp("head-with-length", b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", b"HEAD"),
    resp("connect-ok", b"HTTP/1.1 200 Connection Established\r\n\r\n", b"CONNECT"),
    resp("continue", b"HTTP/1.1 100 Continue\r\n\r\n"),
    resp("te-and-length", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
         b"Content-Length: 9\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
    resp("bad-status", b"HTTP/1.1 20 OK\r\n\r\n"),
    resp("bad-status-word", b"HTTP/1.1 abc OK\r\n\r\n"),
    resp("conflicting-lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n"
         b"Content-Length: 2\r\n\r\nhi"),
    resp("te-gzip-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
         b"2\r\nhi\r\n0\r\n\r\n",
         laxer="RFC 9112 6.1: a response may layer codings before chunked; relayed as is"),
    resp("te-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nrest",
         laxer="RFC 9112 6.3: chunked not last in a response: read until close"),
]


@pytest.mark.parametrize("case", CASES, ids=[("req-" if c.request else "resp-") + c.name
                                             for c in CASES])
def test_same_view_as_h11(case: Case) -> None:
    try:
        theirs: View | None = _h11(case.data, request=case.request, method=case.method,
                                   head_only=case.head_only)
    except h11.ProtocolError:
        theirs = None
    try:
        ours: View | None = _ours(case.data, request=case.request, method=case.method,
                                  head_only=case.head_only)
    except HttpError:
        ours = None
    if case.stricter:
        assert ours is None and theirs is not None, "no longer stricter: drop the mark"
    elif case.laxer:
        assert case.request is False and ours is not None and theirs is None
    else:
        assert ours == theirs


def test_every_case_has_a_distinct_stream() -> None:
    assert len({(c.request, c.method, c.data) for c in CASES}) == len(CASES)
    assert len({c.name for c in CASES if c.request}) == sum(c.request for c in CASES)
