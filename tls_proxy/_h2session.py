"""HTTP/2 on both sides (used only when the client and the upstream both chose ``h2``).

Each client stream is mapped to an upstream stream. HEADERS are HPACK-decoded by the
``h2`` library, checked (``:authority``/``host`` must equal the SNI), substituted
(header values, Basic credentials, the query of ``:path``) and scanned for placeholders
of secrets this host may not receive; DATA is scanned (never substituted: the ``body``
scope applies to HTTP/1.1 only). A violation answers that stream ``403`` (JSON) or
resets it if its response already started; other streams continue. Flow control is
end to end: received data is acknowledged only once the other side accepted it.

Example::

    >>> from tls_proxy._h2session import H2Session
    >>> H2Session.__doc__.splitlines()[0]
    'Bridges one HTTP/2 client connection to one HTTP/2 upstream connection.'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes

from tls_proxy._decode import BodyDecoder
from tls_proxy._hosts import canonical_host
from tls_proxy._secrets import Scanner, SecretPolicy, StreamScanner, Substituter, Violation
from tls_proxy._session import SessionLimits, SessionStats, blocked_body
from tls_proxy._streams import Duplex
from tls_proxy.errors import HttpError

log = logging.getLogger("tls_proxy")

MAX_HEADER_LIST = 65536
MAX_STREAMS = 128
BUFFER_LIMIT = 1 << 20


@dataclass
class _Out:
    """Data waiting for flow-control window on one outgoing stream."""

    buf: bytearray = field(default_factory=bytearray)
    end: bool = False
    trailers: list[tuple[bytes, bytes]] | None = None
    unacked: int = 0  # bytes received on the source stream not yet acknowledged
    done: bool = False


def error_body(e: HttpError) -> bytes:
    """JSON body for a proxy-generated error on one stream.

    Example::

        >>> error_body(HttpError(415, "x"))[:22]
        b'{"error": "bad_request'
    """
    return blocked_body("bad_request", e.reason)


class H2Session:
    """Bridges one HTTP/2 client connection to one HTTP/2 upstream connection.

    Example::

        >>> await H2Session(tls, up, "api.example.com", policy, limits, stats).run()  # doctest: +SKIP
    """

    def __init__(self, client: Duplex, upstream: Duplex, sni: str, policy: SecretPolicy,
                 limits: SessionLimits, stats: SessionStats) -> None:
        self.client, self.upstream = client, upstream
        self.sni = canonical_host(sni)
        self.limits, self.stats = limits, stats
        elig, inel = policy.split(self.sni)
        self.sub = Substituter(elig)
        self.scan = Scanner(inel)
        self.c = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.u = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.c2u: dict[int, int] = {}
        self.u2c: dict[int, int] = {}
        self.to_u: dict[int, _Out] = {}  # keyed by upstream stream id
        self.to_c: dict[int, _Out] = {}  # keyed by client stream id
        self.scanners: dict[int, StreamScanner] = {}
        self.decoders: dict[int, BodyDecoder] = {}
        self.inflated: dict[int, StreamScanner] = {}
        self.blocked: set[int] = set()  # client stream ids answered by the proxy
        self.started: set[int] = set()  # client stream ids whose response began

    async def run(self, initial: bytes = b"") -> None:
        """Serve until either side closes."""
        self.c.initiate_connection()
        self.u.initiate_connection()
        limits: dict[SettingCodes | int, int] = {
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        }
        self.c.update_settings(limits)
        self.u.update_settings({**limits, SettingCodes.ENABLE_PUSH: 0})
        self._flush_io()
        tasks = [asyncio.ensure_future(self._loop(self.client, True, initial)),
                 asyncio.ensure_future(self._loop(self.upstream, False, b""))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=1)
            for t in tasks:
                if t.done() and not t.cancelled():
                    e = t.exception()
                    if e is not None and not isinstance(e, ConnectionError | OSError | H2Error):
                        log.error("internal error in h2 session for %s: %s", self.sni,
                                  e.__class__.__name__)
            with contextlib.suppress(Exception):
                self.c.close_connection()
                self.client.send(self.c.data_to_send())
                await asyncio.wait_for(self.client.drain(), 1)
            self.client.close()
            self.upstream.close()

    async def _loop(self, src: Duplex, from_client: bool, initial: bytes) -> None:
        conn = self.c if from_client else self.u
        data = initial
        while True:
            if not data:
                try:
                    data = await asyncio.wait_for(src.recv(), self.limits.idle_timeout)
                except TimeoutError:
                    return
                if not data:
                    return
            try:
                events = conn.receive_data(data)
            except H2Error as e:
                log.info("HTTP/2 protocol error from %s: %s",
                         "client" if from_client else "upstream", e.__class__.__name__)
                self._flush_io()
                return
            data = b""
            for ev in events:
                if isinstance(ev, ConnectionTerminated):
                    self._flush_io()
                    return
                if from_client:
                    self._client_event(ev)
                else:
                    self._upstream_event(ev)
            self._flush_io()
            await self.client.drain()
            await self.upstream.drain()

    def _flush_io(self) -> None:
        out = self.c.data_to_send()
        if out:
            self.client.send(out)
        out = self.u.data_to_send()
        if out:
            self.upstream.send(out)

    # ----- client -> upstream -------------------------------------------------

    def _violation(self, csid: int, v: Violation, method: bytes, path: bytes) -> None:
        self.stats.blocked += 1
        event = (f"blocked secret placeholder: env={v.env} location={v.location} form={v.form} "
                 f"sni={self.sni} method={method.decode('latin-1')} "
                 f"path={path.split(b'?', 1)[0][:200].decode('latin-1')} (h2)")
        self.stats.events.append(event)
        log.warning("%s", event)
        self._answer(csid, 403, blocked_body("secret_policy_denied", v.reason()))

    def _answer(self, csid: int, status: int, body: bytes) -> None:
        self.blocked.add(csid)
        usid = self.c2u.get(csid)
        if usid is not None:
            with contextlib.suppress(H2Error):
                self.u.reset_stream(usid, ErrorCodes.CANCEL)
        try:
            if csid in self.started:
                self.c.reset_stream(csid, ErrorCodes.REFUSED_STREAM)
                return
            self.c.send_headers(csid, [(b":status", str(status).encode()),
                                       (b"content-type", b"application/json"),
                                       (b"content-length", str(len(body)).encode())])
            self.started.add(csid)
            self.c.send_data(csid, body, end_stream=True)
        except H2Error:
            with contextlib.suppress(H2Error):
                self.c.reset_stream(csid, ErrorCodes.REFUSED_STREAM)

    def _client_event(self, ev: object) -> None:
        if isinstance(ev, RequestReceived):
            self._request(ev)
        elif isinstance(ev, DataReceived):
            self._client_data(ev)
        elif isinstance(ev, StreamEnded):
            usid = self.c2u.get(ev.stream_id)
            if usid is not None and ev.stream_id not in self.blocked:
                self.to_u[usid].end = True
                self._push(self.u, usid, self.to_u[usid], self.c, ev.stream_id)
        elif isinstance(ev, StreamReset):
            usid = self.c2u.get(ev.stream_id)
            if usid is not None:
                with contextlib.suppress(H2Error):
                    self.u.reset_stream(usid, ErrorCodes.CANCEL)
        elif isinstance(ev, WindowUpdated):
            self._window(self.c, self.to_c, ev.stream_id, self.u, self.c2u)
        elif isinstance(ev, TrailersReceived):
            self._client_trailers(ev)

    def _request(self, ev: RequestReceived) -> None:
        csid = ev.stream_id
        headers = [(bytes(k), bytes(v)) for k, v in (ev.headers or [])]
        pseudo = {k: v for k, v in headers if k.startswith(b":")}
        method, path = pseudo.get(b":method", b""), pseudo.get(b":path", b"")
        auths = [v for k, v in headers if k in (b":authority", b"host")]
        hosts = {canonical_host(a.decode("latin-1")) for a in auths}
        if self.limits.enforce_authority and (not hosts or hosts != {self.sni}):
            self.stats.blocked += 1
            shown = sorted(hosts)[0][:100] if hosts else ""
            log.warning("blocked authority mismatch: sni=%s authority=%s (h2)", self.sni, shown)
            self._answer(csid, 403, blocked_body(
                "authority_mismatch",
                f"authority {shown!r} does not match TLS server name {self.sni!r}"))
            return
        self.stats.requests += 1
        new: list[tuple[bytes, bytes]] = []
        for k, hv in headers:
            if k == b":path":
                nv = self.sub.target(hv)
            elif k.startswith(b":"):
                nv = hv
            else:
                nv = self.sub.header_value(hv, k == b"authorization")
            new.append((k, nv))
        if new != headers:
            self.stats.substituted += 1
        if self.scan:
            flat = b"\r\n".join(k + b": " + x for k, x in new)
            found = self.scan.find(flat, "request headers")
            for k, val in new:
                if found is None and k in (b"authorization", b"proxy-authorization"):
                    found = self.scan.find_basic(val)
            if found:
                self._violation(csid, found, method, path)
                return
        if self.scan and ev.stream_ended is None:
            codings = [c.strip().lower() for k, v in new if k == b"content-encoding"
                       for c in v.split(b",") if c.strip().lower() not in (b"", b"identity")]
            if codings:
                try:
                    if len(codings) != 1:
                        raise HttpError(415, "cannot inspect stacked Content-Encodings")
                    self.decoders[csid] = BodyDecoder.for_coding(codings[0])
                except HttpError as e:
                    self._answer(csid, e.status, error_body(e))
                    return
        usid = self.u.get_next_available_stream_id()
        self.c2u[csid], self.u2c[usid] = usid, csid
        self.to_u[usid] = _Out()
        self.scanners[csid] = StreamScanner(self.scan, "h2 body")
        self.u.send_headers(usid, new, end_stream=ev.stream_ended is not None)
        if ev.stream_ended is not None:
            self.to_u[usid].done = True

    def _client_data(self, ev: DataReceived) -> None:
        csid = ev.stream_id
        n = ev.flow_controlled_length or 0
        usid = self.c2u.get(csid)
        if csid in self.blocked or usid is None:
            with contextlib.suppress(H2Error):
                self.c.acknowledge_received_data(n, csid)
            return
        data = bytes(ev.data or b"")
        v = self.scanners[csid].feed(data)
        dec = self.decoders.get(csid)
        if v is None and dec is not None:
            inflated = self.inflated.setdefault(
                csid, StreamScanner(self.scan, "decompressed h2 body"))
            try:
                for part in dec.feed(data):
                    v = inflated.feed(part)
                    if v:
                        break
            except HttpError as e:
                self._answer(csid, e.status, error_body(e))
                with contextlib.suppress(H2Error):
                    self.c.acknowledge_received_data(n, csid)
                return
        if v:
            self._violation(csid, v, b"DATA", b"")
            with contextlib.suppress(H2Error):
                self.c.acknowledge_received_data(n, csid)
            return
        out = self.to_u[usid]
        out.buf += data
        out.unacked += n
        self._push(self.u, usid, out, self.c, csid)

    def _client_trailers(self, ev: TrailersReceived) -> None:
        usid = self.c2u.get(ev.stream_id)
        if usid is None or ev.stream_id in self.blocked:
            return
        trailers = [(bytes(k), bytes(v)) for k, v in (ev.headers or [])]
        if self.scan:
            found = self.scan.find(b"\r\n".join(k + b": " + x for k, x in trailers), "trailers")
            if found:
                self._violation(ev.stream_id, found, b"TRAILERS", b"")
                return
        self.to_u[usid].trailers = trailers

    # ----- upstream -> client -------------------------------------------------

    def _upstream_event(self, ev: object) -> None:
        if isinstance(ev, ResponseReceived | InformationalResponseReceived):
            csid = self.u2c.get(ev.stream_id)
            if csid is None or csid in self.blocked:
                return
            final = isinstance(ev, ResponseReceived)
            if final:
                self.started.add(csid)
                self.to_c[csid] = _Out()
            ended = final and getattr(ev, "stream_ended", None) is not None
            self.c.send_headers(csid, list(ev.headers or []), end_stream=ended)
            if ended:
                self.to_c[csid].done = True
        elif isinstance(ev, DataReceived):
            csid = self.u2c.get(ev.stream_id)
            n = ev.flow_controlled_length or 0
            if csid is None or csid in self.blocked or csid not in self.to_c:
                with contextlib.suppress(H2Error):
                    self.u.acknowledge_received_data(n, ev.stream_id)
                return
            out = self.to_c[csid]
            out.buf += bytes(ev.data or b"")
            out.unacked += n
            self._push(self.c, csid, out, self.u, ev.stream_id)
        elif isinstance(ev, TrailersReceived):
            csid = self.u2c.get(ev.stream_id)
            if csid is not None and csid in self.to_c:
                self.to_c[csid].trailers = [(bytes(k), bytes(v)) for k, v in (ev.headers or [])]
        elif isinstance(ev, StreamEnded):
            csid = self.u2c.get(ev.stream_id)
            if csid is not None and csid in self.to_c and csid not in self.blocked:
                self.to_c[csid].end = True
                self._push(self.c, csid, self.to_c[csid], self.u, ev.stream_id)
        elif isinstance(ev, StreamReset):
            csid = self.u2c.get(ev.stream_id)
            if csid is not None and csid not in self.blocked:
                with contextlib.suppress(H2Error):
                    self.c.reset_stream(csid, ErrorCodes.CANCEL)
        elif isinstance(ev, WindowUpdated):
            self._window(self.u, self.to_u, ev.stream_id, self.c, self.u2c)

    # ----- flow control ----------------------------------------------------------

    def _window(self, conn: H2Connection, outs: dict[int, _Out], sid: int,
                other: H2Connection, back: dict[int, int]) -> None:
        rev = {v: k for k, v in back.items()}  # outgoing sid -> source sid
        targets = list(outs) if sid == 0 else [sid]
        for t in targets:
            if t in outs and t in rev:
                self._push(conn, t, outs[t], other, rev[t])

    def _push(self, conn: H2Connection, sid: int, out: _Out, src: H2Connection,
              src_sid: int) -> None:
        """Send what the window allows on ``sid``; acknowledge drained bytes on ``src``."""
        if out.done:
            return
        try:
            while out.buf:
                room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if room <= 0:
                    break
                piece = bytes(out.buf[:room])
                del out.buf[:room]
                conn.send_data(sid, piece)
            if not out.buf and out.end:
                if out.trailers:
                    conn.send_headers(sid, out.trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
                out.done = True
        except H2Error:
            out.done = True
            return
        if out.unacked and len(out.buf) < BUFFER_LIMIT:
            with contextlib.suppress(H2Error):
                src.acknowledge_received_data(out.unacked, src_sid)
            out.unacked = 0
