"""The registry client's HTTP side on :mod:`httpx` (private to :mod:`rootfs._registry`).

:class:`Session` is one :class:`httpx.Client` per registry client, shared by the
pull's worker threads: redirects (a blob redirected to storage on another host never
carries our ``Authorization`` header there; an ``https`` registry is never redirected
to plain ``http``), the registry auth dance as an :class:`httpx.Auth` flow (HTTP 401
with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` -> a token request,
with Basic credentials if we have any -> the request again with the token; or plain
Basic auth), and under it httpx's transport seam: keep-alive :mod:`http.client`
connections (see :class:`_Transport` for why not httpcore's) and retries with
exponential backoff on transient failures (connection errors and resets, timeouts,
408/425/429, 5xx; ``Retry-After`` honoured). Errors leave as
:class:`rootfs.errors.RegistryError`/:class:`~rootfs.errors.AuthError`, one line each.

Example::

    >>> s = Session("127.0.0.1:5000", "http", "127.0.0.1:5000", username=None, basic=None,
    ...             ssl_context=ssl.create_default_context, timeout=5, retries=0, backoff=0)
    >>> s.close()
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import httpx

from rootfs.errors import AuthError, RegistryError

USER_AGENT = "microvm-sandbox-rootfs/0.1"
MAX_REDIRECTS = 5
_MAX_TOKEN = 4 << 20
_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}
_REPO_PATH = re.compile(r"/v2/(?P<repo>.+)/(?:manifests|blobs|tags)/[^/]+\Z")


@dataclass(frozen=True)
class _Names:
    """What the auth flow and the error messages need to know about the client."""

    registry: str
    scheme: str
    host: str
    username: str | None
    basic: str | None


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Parse a ``WWW-Authenticate`` header into (scheme, params).

    Example::

        >>> parse_challenge('Bearer realm="https://a/token",service="reg"')
        ('bearer', {'realm': 'https://a/token', 'service': 'reg'})
    """
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3) or "")
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    """The :class:`ssl.SSLError` under an exception chain, if any."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_READ_SIZE = 1 << 20
"""Body bytes read per chunk (read straight from the socket into the chunk)."""
_MAX_IDLE = 8
"""Idle keep-alive connections kept per origin."""

_Origin = tuple[str, str, int | None]


class _Body(httpx.SyncByteStream):
    """A response body read from its :mod:`http.client` connection, errors as httpx's.

    Closing it returns the connection to the pool when the body was read to its end
    and the server keeps the connection open; otherwise the connection is closed.
    """

    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection,
                 pool: _Pool, origin: _Origin) -> None:
        self._resp = resp
        self._conn = conn
        self._pool = pool
        self._origin = origin

    def __iter__(self) -> Iterator[bytes]:
        try:
            while chunk := self._resp.read(_READ_SIZE):
                yield chunk
        except http.client.IncompleteRead as exc:
            raise httpx.RemoteProtocolError(
                f"peer closed the connection {len(exc.partial)} bytes into a short read") from exc
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"no data for {self._conn.timeout} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc

    def close(self) -> None:
        if self._resp.isclosed() and not self._resp.will_close:
            self._pool.put(self._origin, self._conn)
        else:
            self._conn.close()


class _Pool:
    """Keep-alive :mod:`http.client` connections per origin, shared by threads."""

    def __init__(self, ssl_context: Callable[[], ssl.SSLContext]) -> None:
        self._ssl_context = ssl_context
        self._lock = threading.Lock()
        self._idle: dict[_Origin, list[http.client.HTTPConnection]] = {}
        self._closed = False

    def get(self, origin: _Origin, timeout: float | None) -> tuple[http.client.HTTPConnection,
                                                                   bool]:
        """An idle connection (and True), or a new unconnected one (and False)."""
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop(), True
        scheme, host, port = origin
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout,
                                               context=self._ssl_context()), False
        return http.client.HTTPConnection(host, port, timeout=timeout), False

    def put(self, origin: _Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if not self._closed and len(idle) < _MAX_IDLE:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
            self._closed = True  # a body still open closes its connection when done
        for conns in idle.values():
            for conn in conns:
                conn.close()


class _Transport(httpx.BaseTransport):
    """httpx's transport seam over :mod:`http.client` keep-alive connections, with retries.

    Why not httpx's own pool (httpcore): its HTTP/1 body path (h11) copies every
    byte four times; blobs are this client's hot path, and a pull cost ~40% more CPU
    (``benchmarks.rootfs``' pull ratio dropped ~15%). :mod:`http.client` reads a
    body straight from the socket into each chunk. httpx keeps the rest: the auth
    flow, redirects and their credential stripping, URLs, timeouts.

    Our requests are bodiless GETs, so a retry is always safe: connection errors and
    resets, timeouts, 408/425/429 and 5xx (``Retry-After`` honoured) are retried with
    exponential backoff; a kept-alive connection the server had closed is replaced at
    once, without counting as a retry.
    """

    def __init__(self, ssl_context: Callable[[], ssl.SSLContext], retries: int,
                 backoff: float) -> None:
        self.retries = retries
        self.backoff = backoff
        self._pool = _Pool(ssl_context)

    def _send(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin: _Origin = (url.scheme, url.host, url.port)
        timeouts = request.extensions.get("timeout") or {}
        while True:
            conn, reused = self._pool.get(origin, timeouts.get("read"))
            try:
                conn.putrequest(request.method, url.raw_path.decode("ascii"),
                                skip_host=True, skip_accept_encoding=True)
                for name, value in request.headers.raw:
                    conn.putheader(name.decode("latin-1"), value)
                conn.endheaders()
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                connected = conn.sock is not None
                conn.close()
                if reused and isinstance(exc, (ConnectionError, http.client.RemoteDisconnected)):
                    continue  # a kept-alive connection the server had closed: a fresh one
                raise _send_error(exc, connected) from exc
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.getheaders()]
            return httpx.Response(resp.status, headers=headers,
                                  stream=_Body(resp, conn, self._pool, origin))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._send(request)
            except (httpx.NetworkError, httpx.TimeoutException,
                    httpx.RemoteProtocolError) as exc:
                if _tls_cause(exc) is not None or _unknown_host(exc) or attempt >= self.retries:
                    raise
                time.sleep(self.backoff * (2 ** attempt))
                attempt += 1
                continue
            if response.status_code in _TRANSIENT and attempt < self.retries:
                retry_after = response.headers.get("retry-after", "")
                response.close()
                delay = self.backoff * (2 ** attempt)
                if retry_after.isdigit():
                    delay = min(float(retry_after), 30.0)
                time.sleep(delay)
                attempt += 1
                continue
            return response

    def close(self) -> None:
        self._pool.close()


def _unknown_host(exc: BaseException) -> bool:
    """The host name does not exist (no retry can help; a busy resolver can: EAI_AGAIN)."""
    cause = exc.__cause__
    return isinstance(cause, socket.gaierror) and cause.errno == socket.EAI_NONAME


def _send_error(exc: Exception, connected: bool) -> httpx.TransportError:
    """An :mod:`http.client`/socket failure before a response, as httpx's exception."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout(detail) if connected else httpx.ConnectTimeout(detail)
    if isinstance(exc, (ssl.SSLError, ConnectionRefusedError, socket.gaierror)):
        return httpx.ConnectError(detail)
    if isinstance(exc, http.client.HTTPException):
        return httpx.RemoteProtocolError(detail)
    return httpx.ReadError(detail)


class _AuthFlow(httpx.Auth):
    """The registry auth dance for one client: Bearer tokens per repository scope, or Basic.

    Credentials go only to the registry's own origin (and to its token realm); a
    response from elsewhere (blob storage after a redirect) is returned untouched.
    """

    def __init__(self, c: _Names) -> None:
        self.c = c
        self._home = _origin(httpx.URL(f"{c.scheme}://{c.host}/"))
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = {}
        self._basic = False

    def _scope(self, url: httpx.URL) -> str:
        m = _REPO_PATH.match(url.path)
        return f"repository:{m.group('repo')}:pull" if m else "registry:catalog:*"

    def _cached(self, scope: str) -> str | None:
        with self._lock:
            token = self._tokens.get(scope)
            basic = self._basic
        if token:
            return f"Bearer {token}"
        if basic and self.c.basic is not None:
            return self.c.basic
        return None

    def sync_auth_flow(
            self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        c = self.c
        home = self._home
        if _origin(request.url) != home:
            yield request
            return
        scope = self._scope(request.url)
        cached = self._cached(scope)
        if cached is not None:
            request.headers["Authorization"] = cached
        response = yield request
        if response.status_code != 401 or _origin(response.request.url) != home:
            return
        challenge = response.headers.get("www-authenticate")
        if not challenge:
            raise AuthError(f"registry {c.registry}: HTTP 401 without a challenge")
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if c.basic is None:
                raise AuthError(f"registry {c.registry} requires credentials (Basic auth)")
            if cached == c.basic:
                return  # the registry refused them: the caller reports it
            with self._lock:
                self._basic = True
            request.headers["Authorization"] = c.basic
            yield request
            return
        if scheme != "bearer" or "realm" not in params:
            raise AuthError(f"registry {c.registry}: unsupported auth challenge {challenge!r:.120}")
        token = yield from self._token_dance(params, scope)
        with self._lock:
            self._tokens[scope] = token
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

    def _token_dance(self, params: dict[str, str],
                     scope: str) -> Generator[httpx.Request, httpx.Response, str]:
        c = self.c
        realm = params["realm"]
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise AuthError(f"registry {c.registry}: bad token realm {realm!r:.120}")
        if url.scheme == "http" and c.scheme == "https":
            raise AuthError(f"registry {c.registry}: refusing a plain-http token realm {realm!r}")
        query = {"scope": params.get("scope") or scope}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {"Authorization": c.basic} if c.basic is not None else {}
        response = yield httpx.Request("GET", url.copy_merge_params(query), headers=headers)
        length = response.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > _MAX_TOKEN:
            raise RegistryError(f"registry {c.registry}: token response of {length!r:.20} bytes")
        body = response.read()  # (httpx reads it again after the flow: it must stay whole)
        if response.status_code in (401, 403):
            who = f"user {c.username!r}" if c.username is not None else "anonymous access"
            raise AuthError(f"registry {c.registry}: token server refused {who} "
                            f"(HTTP {response.status_code})")
        if response.status_code != 200:
            raise RegistryError(f"registry {c.registry}: token server said "
                                f"HTTP {response.status_code}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"registry {c.registry}: token server returned no token")
        return token


class Session:
    """One registry's :class:`httpx.Client`: GETs that stream, errors as rootfs's.

    ``basic`` is the ``Authorization`` value for our credentials (``username``'s), or
    None for anonymous access. Thread-safe.

    Example::

        >>> s = Session("127.0.0.1:9", "http", "127.0.0.1:9", username=None, basic=None,
        ...             ssl_context=ssl.create_default_context, timeout=5, retries=0, backoff=0)
        >>> s.open("/v2/")
        Traceback (most recent call last):
        ...
        rootfs.errors.RegistryError: GET http://127.0.0.1:9/v2/ failed: [Errno 111] Connection refused
        >>> s.close()
    """

    def __init__(self, registry: str, scheme: str, host: str, *, username: str | None,
                 basic: str | None, ssl_context: Callable[[], ssl.SSLContext], timeout: float,
                 retries: int, backoff: float) -> None:
        self.names = _Names(registry, scheme, host, username, basic)
        self.client = httpx.Client(
            base_url=f"{scheme}://{host}",
            auth=_AuthFlow(self.names),
            transport=_Transport(ssl_context, retries, backoff),
            timeout=httpx.Timeout(timeout),
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            trust_env=False,
            # identity: digests are over the bytes as stored, never a re-encoding
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            event_hooks={"response": [self._check_redirect]},
        )

    def _check_redirect(self, response: httpx.Response) -> None:
        if not response.has_redirect_location:
            return
        location = response.headers["location"]
        registry = self.names.registry
        try:
            target = response.url.join(location)
        except httpx.InvalidURL:
            raise RegistryError(f"registry {registry}: bad redirect to {location!r:.120}")
        if target.scheme not in ("http", "https") or \
                (target.scheme == "http" and self.names.scheme == "https"):
            raise RegistryError(f"registry {registry}: refusing redirect to {location!r:.120}")

    def open(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """GET ``path`` (after auth and redirects); the caller reads and closes the response.

        HTTP 401/403 at the end raise :class:`AuthError`; other statuses are returned.
        """
        request = self.client.build_request("GET", path, headers=headers)
        try:
            response = self.client.send(request, stream=True)
        except httpx.TooManyRedirects:
            raise RegistryError(f"registry {self.names.registry}: more than {MAX_REDIRECTS} "
                                f"redirects for {path}") from None
        except httpx.HTTPError as exc:
            raise _transport_error(exc, request.url) from None
        if response.status_code in (401, 403):
            response.close()
            n = self.names
            who = f"user {n.username!r}" if n.username is not None else "anonymous access"
            raise AuthError(f"registry {n.registry} denied {who} for {path} "
                            f"(HTTP {response.status_code})")
        return response

    def read(self, response: httpx.Response, limit: int) -> bytes:
        """Up to ``limit + 1`` body bytes (so the caller can tell "too large")."""
        buf = bytearray()
        try:
            for chunk in response.iter_bytes():
                buf += chunk
                if len(buf) > limit:
                    break
        except httpx.HTTPError as exc:
            raise _transport_error(exc, response.request.url) from None
        return bytes(buf[:limit + 1])

    def chunks(self, response: httpx.Response, what: str) -> Iterator[bytes]:
        """The body as it arrives (bounded chunks); a broken download raises RegistryError."""
        try:
            yield from response.iter_raw()
        except httpx.HTTPError as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RegistryError(f"download of {what} failed: {detail}") from None

    def close(self) -> None:
        """Close the connections."""
        self.client.close()


def _transport_error(exc: httpx.HTTPError, url: httpx.URL) -> RegistryError:
    host = url.netloc.decode("ascii", "replace")
    tls = _tls_cause(exc)
    if isinstance(tls, ssl.SSLCertVerificationError):
        what = f"TLS verification of {host} failed: {tls.verify_message}"
        return RegistryError(
            f"{what} (pass ca_certs=, or insecure=True for plain HTTP)",
            cli_message=f"{what} (pass --ca-certs, or --insecure for plain HTTP)")
    if tls is not None:
        what = f"TLS handshake with {host} failed: {tls.reason or tls}"
        return RegistryError(
            f"{what} (is it a plain-HTTP registry? then pass insecure=True)",
            cli_message=f"{what} (is it a plain-HTTP registry? then pass --insecure)")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return RegistryError(f"GET {url} failed: {detail}")
