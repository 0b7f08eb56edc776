"""Strict HTTP/1.1 message heads and body framing (requests parsed, responses tracked).

Ambiguous framing is refused rather than guessed: ``Transfer-Encoding`` together with
``Content-Length``, conflicting lengths, obs-folded lines and whitespace before a colon
all raise :class:`~tls_proxy.errors.HttpError` with a 4xx status.

Why our own parser and relay rather than h11 or httpx's: the proxy must stream bodies
through without buffering them, rewrite placeholders in header values only, and refuse
every framing two parsers could read differently (request smuggling), byte for byte;
h11 (a state machine over whole events) would hide the bytes we must pass through. h11
stays the reference: tests/tls_proxy/test_http1_h11.py feeds both the same streams and
allows us to be stricter, never more lenient.

Example::

    >>> from tls_proxy._http1 import parse_head, request_framing
    >>> h = parse_head(b"POST /x HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 3\\r\\n\\r\\n", request=True)
    >>> h.method, h.target, h.get(b"host"), request_framing(h)
    (b'POST', b'/x', b'a', ('length', 3))
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tls_proxy._streams import BufferedReader
from tls_proxy.errors import HttpError

MAX_HEAD = 65536
MAX_HEADERS = 1024
MAX_CHUNK_LINE = 4096
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")


@dataclass
class Head:
    """A parsed start line plus ordered raw headers (names keep their case).

    Example::

        >>> h = Head(b"GET", b"/", b"HTTP/1.1", [(b"Host", b"a")])
        >>> h.serialize()
        b'GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n'
    """

    method: bytes  # for responses: the version
    target: bytes  # for responses: the status code
    version: bytes  # for responses: the reason phrase
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def get_all(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (case-insensitive)."""
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def get(self, name: bytes) -> bytes | None:
        """The single value of ``name``; None if absent; 400 if repeated with different values."""
        vals = self.get_all(name)
        if not vals:
            return None
        if len(set(vals)) > 1:
            raise HttpError(400, f"conflicting {name.decode()} headers")
        return vals[0]

    def remove(self, name: bytes) -> None:
        """Drop every header called ``name``."""
        n = name.lower()
        self.headers = [(k, v) for k, v in self.headers if k.lower() != n]

    def set(self, name: bytes, value: bytes) -> None:
        """Replace all ``name`` headers with one."""
        self.remove(name)
        self.headers.append((name, value))

    def tokens(self, name: bytes) -> list[bytes]:
        """Comma-separated, lower-cased tokens of every ``name`` header."""
        out: list[bytes] = []
        for v in self.get_all(name):
            out += [t.strip().lower() for t in v.split(b",") if t.strip()]
        return out

    def serialize(self) -> bytes:
        """Wire form of the head (start line, headers, blank line)."""
        parts = [self.method, b" ", self.target, b" ", self.version, b"\r\n"]
        for k, v in self.headers:
            parts += [k, b": ", v, b"\r\n"]
        parts.append(b"\r\n")
        return b"".join(parts)

    @property
    def status(self) -> int:
        """Status code of a response head."""
        return int(self.target)


def parse_head(block: bytes, *, request: bool) -> Head:
    """Parse one head (ending in CRLF CRLF). Raises :class:`HttpError` 400 when malformed.

    Example::

        >>> parse_head(b"HTTP/1.1 204 No Content\\r\\n\\r\\n", request=False).status
        204
    """
    lines = block[:-4].split(b"\r\n") if block.endswith(b"\r\n\r\n") else None
    if not lines:
        raise HttpError(400, "message head is not terminated by CRLF CRLF")
    start = lines[0]
    if request:
        parts = start.split(b" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
            raise HttpError(400, f"malformed request line {start[:80]!r}")
        if not _VERSION.match(parts[2]):
            raise HttpError(505, f"unsupported HTTP version {parts[2][:20]!r}")
        if any(c < 0x21 or c == 0x7F for c in parts[1]):
            raise HttpError(400, "request target contains control characters or spaces")
        head = Head(parts[0], parts[1], parts[2])
    else:
        parts = start.split(b" ", 2)
        if len(parts) < 2 or not _VERSION.match(parts[0]) or not re.match(rb"^\d{3}$", parts[1]):
            raise HttpError(502, f"malformed status line from upstream {start[:80]!r}")
        head = Head(parts[0], parts[1], parts[2] if len(parts) == 3 else b"")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    for line in lines[1:]:
        if not line or line[:1] in (b" ", b"\t"):
            raise HttpError(400, "obsolete line folding or empty header line")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise HttpError(400, f"malformed header line {line[:60]!r}")
        value = value.strip(b" \t")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise HttpError(400, f"control character in header {name.decode()!r}")
        head.headers.append((name, value))
    return head


async def read_head(r: BufferedReader, *, request: bool, limit: int = MAX_HEAD) -> Head | None:
    """Read and parse the next head; None at a clean EOF between messages.

    Example::

        >>> head = await read_head(BufferedReader(stream), request=True)  # doctest: +SKIP
    """
    # tolerate (RFC 9112 2.2) a few empty lines before a request
    while request and r.buf[:2] == b"\r\n":
        del r.buf[:2]
    block = await r.read_until(b"\r\n\r\n", limit)
    if not block:
        return None
    return parse_head(block, request=request)


def _content_length(head: Head) -> int | None:
    vals = head.get_all(b"content-length")
    if not vals:
        return None
    nums = {v.strip() for v in b",".join(vals).split(b",")}
    if len(nums) != 1:
        raise HttpError(400, "conflicting Content-Length values")
    (n,) = nums
    if not n.isdigit() or len(n) > 15:
        raise HttpError(400, f"invalid Content-Length {n[:20]!r}")
    return int(n)


def request_framing(head: Head) -> tuple[str, int]:
    """``("none"|"length"|"chunked", n)`` for a request body (RFC 9112 section 6).

    Example::

        >>> request_framing(parse_head(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n", request=True))
        ('none', 0)
    """
    te = head.tokens(b"transfer-encoding")
    cl = _content_length(head)
    if te:
        if cl is not None:
            raise HttpError(400, "both Transfer-Encoding and Content-Length (request smuggling)")
        if te != [b"chunked"]:
            raise HttpError(501, f"unsupported Transfer-Encoding {b','.join(te)[:40]!r}")
        return ("chunked", 0)
    if cl is None or cl == 0:
        return ("none", 0)
    return ("length", cl)


def response_framing(head: Head, method: bytes) -> tuple[str, int]:
    """Framing of a response to ``method``: adds ``"close"`` (read until EOF).

    Example::

        >>> response_framing(parse_head(b"HTTP/1.1 200 OK\\r\\n\\r\\n", request=False), b"GET")
        ('close', 0)
    """
    st = head.status
    if method == b"HEAD" or 100 <= st < 200 or st in (204, 304):
        return ("none", 0)
    if method == b"CONNECT" and 200 <= st < 300:
        return ("none", 0)
    te = head.tokens(b"transfer-encoding")
    if te:
        if te[-1] == b"chunked":
            return ("chunked", 0)
        return ("close", 0)
    cl = _content_length(head)
    if cl is None:
        return ("close", 0)
    return ("length", cl)


async def _chunk_size(r: BufferedReader) -> tuple[int, bytes]:
    line = await r.read_until(b"\r\n", MAX_CHUNK_LINE, status=400)
    if not line:
        raise HttpError(400, "connection closed inside a chunked body")
    size_txt = line[:-2].split(b";", 1)[0].strip()
    if not size_txt or len(size_txt) > 15 or any(c not in b"0123456789abcdefABCDEF" for c in size_txt):
        raise HttpError(400, f"invalid chunk size {size_txt[:20]!r}")
    return int(size_txt, 16), line


async def iter_chunked(r: BufferedReader) -> AsyncIterator[bytes]:
    """Decoded chunk payloads of a chunked body; trailers are read and dropped.

    Example::

        >>> body = b"".join([p async for p in iter_chunked(reader)])  # doctest: +SKIP
    """
    while True:
        size, _ = await _chunk_size(r)
        if size == 0:
            while True:
                t = await r.read_until(b"\r\n", MAX_HEAD, status=400)
                if t in (b"\r\n", b""):
                    return
        remaining = size
        while remaining:
            data = await r.read_some(min(remaining, 65536))
            if not data:
                raise HttpError(400, "connection closed inside a chunk")
            remaining -= len(data)
            yield data
        if await r.read_exact(2) != b"\r\n":
            raise HttpError(400, "chunk not terminated by CRLF")


async def iter_raw_chunked(r: BufferedReader) -> AsyncIterator[bytes]:
    """Wire bytes of a chunked body, unchanged, ending after the last trailer line.

    Example::

        >>> async for raw in iter_raw_chunked(reader): client.send(raw)  # doctest: +SKIP
    """
    while True:
        size, line = await _chunk_size(r)
        yield line
        if size == 0:
            while True:
                t = await r.read_until(b"\r\n", MAX_HEAD, status=502)
                if not t:
                    return
                yield t
                if t == b"\r\n":
                    return
        remaining = size + 2
        while remaining:
            data = await r.read_some(min(remaining, 65536))
            if not data:
                raise HttpError(502, "upstream closed inside a chunk")
            remaining -= len(data)
            yield data


async def iter_length(r: BufferedReader, n: int) -> AsyncIterator[bytes]:
    """Exactly ``n`` body bytes in pieces; :class:`HttpError` 400 at early EOF.

    Example::

        >>> async for piece in iter_length(reader, 10): upstream.send(piece)  # doctest: +SKIP
    """
    while n:
        data = await r.read_some(min(n, 65536))
        if not data:
            raise HttpError(400, f"connection closed with {n} body bytes missing")
        n -= len(data)
        yield data


def chunk(data: bytes) -> bytes:
    """Encode one chunk of a chunked body (``b""`` gives the terminating chunk).

    Example::

        >>> chunk(b"hello"), chunk(b"")
        (b'5\\r\\nhello\\r\\n', b'0\\r\\n\\r\\n')
    """
    if not data:
        return b"0\r\n\r\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def simple_response(status: int, reason: str, body: bytes, content_type: str) -> bytes:
    """A complete ``Connection: close`` response.

    Example::

        >>> simple_response(403, "Forbidden", b"{}", "application/json")[:24]
        b'HTTP/1.1 403 Forbidden\\r\\n'
    """
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
