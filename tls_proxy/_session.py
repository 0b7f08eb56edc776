"""One intercepted HTTP/1.1 connection: substitute eligible secrets, block leaks, relay.

Requests are parsed (strictly) and rewritten; responses are relayed byte-for-byte
with only their framing tracked, so keep-alive, pipelining and ``101`` upgrades work.
A blocked request is answered ``403`` with a JSON body naming the reason, in order
after any earlier pipelined responses, and the connection is closed.

Every violation gets that answer without waiting for the upstream: a request whose
head was already forwarded (its body is streamed) is answered in place of its
response the moment the violation is seen; only when the upstream's response to it
has already started (its status line reached the client) is no answer possible, and
then the connection is closed at once. After a proxy answer the rest of what the
client is still sending is read and discarded for a bounded time (a lingering close),
so the client reads the answer instead of a connection reset.

Example::

    >>> from tls_proxy._session import blocked_body
    >>> blocked_body("secret_policy_denied", "why")
    b'{"error": "secret_policy_denied", "message": "Request blocked by secret policy.", "reason": "why"}'
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from dataclasses import dataclass, field

from tls_proxy._decode import BodyDecoder
from tls_proxy._hosts import canonical_host
from tls_proxy._http1 import (
    Head,
    chunk,
    iter_chunked,
    iter_length,
    iter_raw_chunked,
    read_head,
    request_framing,
    response_framing,
    simple_response,
)
from tls_proxy._secrets import Scanner, SecretPolicy, StreamScanner, Substituter, Violation
from tls_proxy._streams import BufferedReader, Duplex
from tls_proxy.errors import HttpError

log = logging.getLogger("tls_proxy")

_MESSAGES = {
    "secret_policy_denied": "Request blocked by secret policy.",
    "authority_mismatch": "Request blocked: Host does not match the TLS server name.",
    "bad_request": "Malformed request.",
    "upstream_error": "The upstream could not be reached securely.",
}
_REASONS = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 413: "Content Too Large",
            415: "Unsupported Media Type",
            431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
            505: "HTTP Version Not Supported"}


def _encoded(head: Head) -> bool:
    return any(c not in (b"identity", b"") for c in head.tokens(b"content-encoding"))


def blocked_body(code: str, reason: str) -> bytes:
    """The JSON body of a proxy-generated error (never contains a secret value).

    Example::

        >>> blocked_body("authority_mismatch", "r")[:32]
        b'{"error": "authority_mismatch", '
    """
    msg = _MESSAGES.get(code, "Request blocked.")
    return json.dumps({"error": code, "message": msg, "reason": reason}).encode()


def error_response(status: int, code: str, reason: str) -> bytes:
    """A complete ``Connection: close`` JSON error response.

    Example::

        >>> error_response(403, "secret_policy_denied", "x").split(b"\\r\\n")[0]
        b'HTTP/1.1 403 Forbidden'
    """
    return simple_response(
        status, _REASONS.get(status, "Error"), blocked_body(code, reason), "application/json"
    )


@dataclass
class SessionLimits:
    """Timeouts and caps for one session.

    Example::

        >>> SessionLimits(header_timeout=5).max_body_buffer
        16777216
    """

    header_timeout: float = 30.0
    idle_timeout: float = 300.0
    max_body_buffer: int = 16 * 1024 * 1024
    enforce_authority: bool = True


LINGER_IDLE = 2.0
"""Seconds without client bytes that end a lingering close."""
LINGER_MAX = 10.0
"""Upper bound in seconds of a lingering close."""


@dataclass
class _Pending:
    method: bytes
    upgrade: asyncio.Future[bool] | None = None
    replaced_by: bytes | None = None
    # set once the request is answered by the proxy (``replaced_by``) while its head is
    # upstream: the response side stops waiting for the upstream's response
    replaced: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False  # the upstream's final response head reached the client
    streaming: bool = False  # the head is upstream, the body is still being relayed


@dataclass
class SessionStats:
    """Counters shared by every session of a proxy.

    Example::

        >>> SessionStats().requests
        0
    """

    requests: int = 0
    substituted: int = 0
    blocked: int = 0
    events: deque[str] = field(default_factory=lambda: deque(maxlen=1000))
    """The most recent block events (bounded), same text as the log lines."""


class Http1Session:
    """Relays one client <-> upstream HTTP/1.1 connection for server name ``sni``.

    Example::

        >>> await Http1Session(tls, up, "api.example.com", policy, limits, stats).run()  # doctest: +SKIP
    """

    def __init__(
        self,
        client: Duplex,
        upstream: Duplex,
        sni: str,
        policy: SecretPolicy,
        limits: SessionLimits,
        stats: SessionStats,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.sni = canonical_host(sni)
        self.limits = limits
        self.stats = stats
        elig, inel = policy.split(self.sni)
        self.sub = Substituter(elig)
        self.scan = Scanner(inel)
        self.creader = BufferedReader(client, idle_timeout=limits.idle_timeout)
        self.ureader = BufferedReader(upstream, idle_timeout=limits.idle_timeout)
        self.queue: asyncio.Queue[_Pending | bytes | None] = asyncio.Queue()
        self.outstanding = 0
        self.answered = False  # a proxy reply (Connection: close) was sent to the client
        self.aborted = False  # a violation came too late to answer: connection dropped

    async def run(self) -> None:
        """Serve until either side closes, then close both.

        If the response side ends first (upstream closed, or a proxy reply was sent),
        the request side is cancelled at once instead of idling until its timeout.
        """
        req = asyncio.ensure_future(self._requests())
        resp = asyncio.ensure_future(self._responses())
        try:
            done, _ = await asyncio.wait({req, resp}, return_when=asyncio.FIRST_COMPLETED)
            client_failed = req in done and not req.cancelled() and req.exception() is not None
            if resp not in done and not client_failed and not self.aborted:
                await asyncio.wait({resp}, timeout=self.limits.idle_timeout)
        finally:
            for t in (req, resp):
                t.cancel()
            await asyncio.wait({req, resp}, timeout=1)
            for t in (req, resp):
                if t.done() and not t.cancelled():
                    e = t.exception()
                    if e is not None and not isinstance(e, ConnectionError | OSError | HttpError):
                        log.error("internal error in session for %s: %s", self.sni,
                                  e.__class__.__name__)
            self.upstream.close()
            if self.answered and not self.aborted:
                with contextlib.suppress(Exception):
                    await self._linger()
            self.client.close()

    async def _linger(self) -> None:
        """After a proxy answer: signal the end, then discard what the client still sends
        (bounded), so an unread request body does not turn our answer into a reset."""
        self.client.shutdown_write()
        await self.client.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_MAX
        while (left := deadline - loop.time()) > 0:
            data = await asyncio.wait_for(self.client.recv(), min(LINGER_IDLE, left))
            if not data:
                return

    # ----- request direction -------------------------------------------------

    def _block(self, v: Violation, head: Head) -> bytes:
        path = head.target.split(b"?", 1)[0][:200].decode("latin-1")
        self.stats.blocked += 1
        event = (
            f"blocked secret placeholder: env={v.env} location={v.location} form={v.form} "
            f"sni={self.sni} method={head.method.decode('latin-1')} path={path}"
        )
        self.stats.events.append(event)
        log.warning("%s", event)
        return error_response(403, "secret_policy_denied", v.reason())

    def _check_authority(self, head: Head) -> bytes | None:
        hosts = head.get_all(b"host")
        if len(hosts) != 1:
            raise HttpError(400, f"expected exactly one Host header, got {len(hosts)}")
        host = canonical_host(hosts[0].decode("latin-1"))
        target = head.target
        auth = None
        if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            auth = target.split(b"//", 1)[1].split(b"/", 1)[0].split(b"?", 1)[0]
        bad = host != self.sni or (
            auth is not None and canonical_host(auth.decode("latin-1")) != self.sni
        )
        if bad and self.limits.enforce_authority:
            self.stats.blocked += 1
            event = f"blocked authority mismatch: sni={self.sni} host={host[:100]}"
            self.stats.events.append(event)
            log.warning("%s", event)
            return error_response(
                403, "authority_mismatch",
                f"Host {host[:100]!r} does not match TLS server name {self.sni!r}",
            )
        return None

    def _rewrite_head(self, head: Head) -> Violation | None:
        if self.sub:
            new_target = self.sub.target(head.target)
            new_headers = []
            for k, hv in head.headers:
                new_headers.append((k, self.sub.header_value(hv, k.lower() == b"authorization")))
            changed = new_target != head.target or new_headers != head.headers
            head.target, head.headers = new_target, new_headers
            if changed:
                self.stats.substituted += 1
        if self.scan:
            found = self.scan.find(head.serialize(), "request head")
            if found:
                return found
            for k, val in head.headers:
                if k.lower() in (b"authorization", b"proxy-authorization"):
                    vb = self.scan.find_basic(val)
                    if vb:
                        return vb
        return None

    async def _read_request_head(self) -> Head | None:
        try:
            return await asyncio.wait_for(
                read_head(self.creader, request=True), self.limits.header_timeout
            )
        except TimeoutError:
            if self.creader.buf:
                raise HttpError(408, "request head not received in time") from None
            return None

    async def _requests(self) -> None:
        while True:
            try:
                head = await self._read_request_head()
                if head is None:
                    break
                self.stats.requests += 1
                reply = self._check_authority(head)
                if reply:
                    self.queue.put_nowait(reply)
                    return
                framing = request_framing(head)
                v = self._rewrite_head(head)
                if v:
                    self.queue.put_nowait(self._block(v, head))
                    return
                pending = _Pending(head.method)
                wants_upgrade = b"upgrade" in head.tokens(b"connection") and head.get_all(b"upgrade")
                if wants_upgrade:
                    pending.upgrade = asyncio.get_running_loop().create_future()
                if framing[0] != "none" and self.sub.body and not _encoded(head):
                    blocked = await self._send_buffered(head, framing, pending)
                else:
                    blocked = await self._send_streamed(head, framing, pending)
                if blocked:
                    return
                if pending.upgrade is not None and await pending.upgrade:
                    await self._pump_upgraded()
                    return
                if b"close" in head.tokens(b"connection"):
                    break
            except HttpError as e:
                code = "bad_request"
                self.queue.put_nowait(error_response(e.status, code, e.reason))
                return
        self.queue.put_nowait(None)

    def _expect_continue(self, head: Head) -> None:
        if b"100-continue" in head.tokens(b"expect") and self.outstanding == 0:
            head.remove(b"expect")
            self.client.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _send_buffered(self, head: Head, framing: tuple[str, int], p: _Pending) -> bool:
        cap = self.limits.max_body_buffer
        if framing[0] == "length" and framing[1] > cap:
            self.queue.put_nowait(
                error_response(413, "bad_request", f"body larger than {cap} bytes cannot be "
                               "inspected for secret substitution")
            )
            return True
        self._expect_continue(head)
        parts: list[bytes] = []
        size = 0
        it = iter_chunked(self.creader) if framing[0] == "chunked" else iter_length(
            self.creader, framing[1])
        async for piece in it:
            size += len(piece)
            if size > cap:
                self.queue.put_nowait(
                    error_response(413, "bad_request", f"body larger than {cap} bytes")
                )
                return True
            parts.append(piece)
        body = self.sub.body_bytes(b"".join(parts))
        v = self.scan.find(body, "body") if self.scan else None
        if v:
            self.queue.put_nowait(self._block(v, head))
            return True
        if framing[0] == "chunked":
            wire = (chunk(body) if body else b"") + chunk(b"")
        else:
            head.set(b"Content-Length", str(len(body)).encode())
            wire = body
        self.outstanding += 1
        self.queue.put_nowait(p)
        self.upstream.send(head.serialize() + wire)
        await self.upstream.drain()
        return False

    async def _send_streamed(self, head: Head, framing: tuple[str, int], p: _Pending) -> bool:
        decoder = None
        if framing[0] != "none" and self.scan and _encoded(head):
            codings = head.tokens(b"content-encoding")
            if len(codings) != 1:
                raise HttpError(415, "cannot inspect stacked Content-Encodings for placeholders")
            decoder = BodyDecoder.for_coding(codings[0])
        self._expect_continue(head)
        self.outstanding += 1
        p.streaming = framing[0] != "none"
        self.queue.put_nowait(p)
        self.upstream.send(head.serialize())
        if framing[0] == "none":
            await self.upstream.drain()
            return False
        try:
            return await self._stream_body(head, framing, p, decoder)
        except HttpError as e:
            # the head is already upstream: answer in its place
            self._answer_in_place(p, error_response(e.status, "bad_request", e.reason))
            return True
        finally:
            p.streaming = False

    def _answer_in_place(self, p: _Pending, reply: bytes) -> None:
        """Answer ``p`` (whose head is upstream) with ``reply`` instead of its response.

        The response side sends ``reply`` as soon as the earlier responses are relayed,
        without waiting for the upstream; if the upstream's response to ``p`` already
        started, no answer is possible and the connection is dropped now.
        """
        if p.started:
            log.warning("closing connection to %s: the response had already started", self.sni)
            self.aborted = True
            self.upstream.close()
            self.client.close()
            return
        p.replaced_by = reply
        p.replaced.set()

    async def _stream_body(
        self, head: Head, framing: tuple[str, int], p: _Pending, decoder: BodyDecoder | None
    ) -> bool:
        ss = StreamScanner(self.scan, "body")
        inflated = StreamScanner(self.scan, "decompressed body")
        chunked = framing[0] == "chunked"
        it = iter_chunked(self.creader) if chunked else iter_length(self.creader, framing[1])
        async for piece in it:
            v = ss.feed(piece)
            if decoder is not None and v is None:
                for part in decoder.feed(piece):
                    v = inflated.feed(part)
                    if v:
                        break
            if v:
                self._answer_in_place(p, self._block(v, head))
                return True
            self.upstream.send(chunk(piece) if chunked else piece)
            await self.upstream.drain()
        if chunked:
            self.upstream.send(chunk(b""))
        await self.upstream.drain()
        return False

    async def _pump_upgraded(self) -> None:
        ss = StreamScanner(self.scan, "upgraded stream")
        while True:
            data = await self.creader.read_some()
            if not data:
                self.upstream.shutdown_write()
                return
            v = ss.feed(data)
            if v:
                self.stats.blocked += 1
                log.warning("blocked secret placeholder in upgraded stream: env=%s sni=%s",
                            v.env, self.sni)
                self.upstream.close()
                self.client.close()
                return
            self.upstream.send(data)
            await self.upstream.drain()

    # ----- response direction ------------------------------------------------

    async def _responses(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            if isinstance(item, bytes):
                self.answered = True
                self.client.send(item)
                await self.client.drain()
                return
            if not await self._relay_response(item):
                return
            self.outstanding -= 1

    async def _relay_response(self, p: _Pending) -> bool:
        """Relay the response(s) for one request; False when the connection must end."""
        try:
            while True:
                head = await self._response_head(p)
                if p.replaced_by is not None:
                    self.answered = True
                    self.client.send(p.replaced_by)
                    await self.client.drain()
                    return False
                if head is None:
                    return False
                st = head.status
                if st >= 200 or st == 101:
                    p.started = True
                self.client.send(head.serialize())
                if st == 101:
                    if p.upgrade is None:
                        return False
                    p.upgrade.set_result(True)
                    await self._pump_raw(self.ureader, self.client)
                    return False
                if 100 <= st < 200:
                    await self.client.drain()
                    continue
                kind, n = response_framing(head, p.method)
                if kind == "length":
                    async for piece in iter_length(self.ureader, n):
                        self.client.send(piece)
                        await self.client.drain()
                elif kind == "chunked":
                    async for piece in iter_raw_chunked(self.ureader):
                        self.client.send(piece)
                        await self.client.drain()
                elif kind == "close":
                    await self._pump_raw(self.ureader, self.client)
                    return False
                await self.client.drain()
                if p.upgrade is not None and not p.upgrade.done():
                    p.upgrade.set_result(False)
                return b"close" not in head.tokens(b"connection")
        except HttpError as e:
            if p.replaced_by is not None and not p.started:
                self.answered = True
                self.client.send(p.replaced_by)
            else:
                log.info("bad response from upstream %s: %s", self.sni, e.reason)
            return False
        finally:
            if p.upgrade is not None and not p.upgrade.done():
                p.upgrade.set_result(False)

    async def _response_head(self, p: _Pending) -> Head | None:
        """The upstream's next response head for ``p``, unless the proxy answers ``p``
        first (then None, with ``p.replaced_by`` set)."""
        if p.replaced.is_set():
            return None
        if not p.streaming:  # nothing more of p's request to inspect: no answer can come
            return await read_head(self.ureader, request=False)
        reading = asyncio.ensure_future(read_head(self.ureader, request=False))
        replaced = asyncio.ensure_future(p.replaced.wait())
        try:
            await asyncio.wait({reading, replaced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            replaced.cancel()
            if not reading.done():
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
        if p.replaced.is_set():
            return None
        return reading.result()

    @staticmethod
    async def _pump_raw(src: BufferedReader, dst: Duplex) -> None:
        while True:
            data = await src.read_some()
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown_write()
                return
            dst.send(data)
            await dst.drain()
