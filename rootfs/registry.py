"""A small native OCI distribution (registry v2) client: manifests and blobs.

The HTTP plumbing is :mod:`httpx`: an :class:`httpx.Client` per registry client,
shared by the pull's worker threads; redirects (a blob redirected to storage on
another host never carries our ``Authorization`` header there, and an ``https``
registry is never redirected to plain ``http``); the registry auth dance as an
:class:`httpx.Auth` flow (HTTP 401 with ``WWW-Authenticate: Bearer realm=...,
service=...,scope=...`` -> a token request, with Basic credentials if we have any
-> the request again with the token; or plain Basic auth). Under it, httpx's
transport seam holds keep-alive :mod:`http.client` connections (its own pool's
HTTP/1 body path costs ~40% more CPU per pull: see :class:`_Transport`) and the
retries with exponential backoff on transient failures (connection errors and
resets, timeouts, 408/425/429, 5xx; ``Retry-After`` honoured).

Ours on top: media-type negotiation for manifests and indexes, credentials from
``~/.docker/config.json`` as a fallback, TLS with extra CA certificates (the
system's trust store otherwise), plain HTTP only when ``insecure``, typed one-line
errors (:mod:`rootfs.errors`), and every byte checked against its digest while a
blob streams to disk in bounded memory.

Example::

    client = RegistryClient("127.0.0.1:5000", insecure=True)
    body, media_type, digest = client.get_manifest("busybox", "latest")
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

from rootfs.errors import (
    AuthError,
    DigestError,
    ImageNotFoundError,
    InvalidReferenceError,
    RegistryError,
    RootfsError,
)
from rootfs.image import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from rootfs.reference import _COMPONENT, _HOST, _TAG, DEFAULT_REGISTRY, validate_digest

ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
USER_AGENT = "microvm-sandbox-rootfs/0.1"
_MAX_MANIFEST = 4 << 20
_MAX_REDIRECTS = 5
_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}
_REPO_PATH = re.compile(r"/v2/(?P<repo>.+)/(?:manifests|blobs|tags)/[^/]+\Z")

ProgressFn = Callable[[str, int, int], None]
"""``progress(layer_digest, bytes_done, bytes_total)``."""


@dataclass(frozen=True)
class RegistryAuth:
    """Username and password (or token as password) for one registry.

    Example::

        >>> RegistryAuth("alice", "s3cret")
        RegistryAuth(username='alice', password=***)
    """

    username: str
    password: str

    def __repr__(self) -> str:
        return f"RegistryAuth(username={self.username!r}, password=***)"

    def basic(self) -> str:
        """The ``Authorization`` header value for HTTP Basic auth.

        Example::

            >>> RegistryAuth("a", "b").basic()
            'Basic YTpi'
        """
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


CaCerts = str | os.PathLike[str] | bytes | Sequence[str | os.PathLike[str] | bytes]


def docker_config_auth(registry: str, config_dir: Path | None = None) -> RegistryAuth | None:
    """Credentials for ``registry`` from ``$DOCKER_CONFIG/config.json`` (``auths`` only).

    Example::

        >>> docker_config_auth("127.0.0.1:5000", Path("/nonexistent")) is None
        True
    """
    base = config_dir or Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        data = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"]
    if registry == DEFAULT_REGISTRY:
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    for key in keys:
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return RegistryAuth(user, pw)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return RegistryAuth(entry["username"], entry["password"])
    return None


@functools.cache
def _system_ssl_context() -> ssl.SSLContext:
    """The system trust store, loaded once per process (it costs ~20 ms)."""
    return ssl.create_default_context()


def _ssl_context(ca_certs: CaCerts | None) -> ssl.SSLContext:
    if ca_certs is None:
        return _system_ssl_context()
    ctx = ssl.create_default_context()
    items: Sequence[str | os.PathLike[str] | bytes]
    items = [ca_certs] if isinstance(ca_certs, (str, bytes, os.PathLike)) else ca_certs
    for item in items:
        if not isinstance(item, (str, bytes, os.PathLike)):
            raise RegistryError(f"bad CA certificate item {item!r:.80}: use a path or PEM bytes")
        try:
            if isinstance(item, bytes):
                ctx.load_verify_locations(cadata=item.decode("ascii"))
            else:
                ctx.load_verify_locations(cafile=os.fspath(item))
        except (OSError, ssl.SSLError, UnicodeDecodeError) as exc:
            raise RegistryError(f"cannot load CA certificates {item!r:.80}: {exc}") from None
    return ctx


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


def _named(repository: str, selector: str) -> str:
    """``repo:tag`` or ``repo@sha256:...`` (a digest selector is pinned with ``@``)."""
    return f"{repository}@{selector}" if ":" in selector else f"{repository}:{selector}"


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


class _RegistryAuthFlow(httpx.Auth):
    """The registry auth dance for one client: Bearer tokens per repository scope, or Basic.

    Credentials go only to the registry's own origin (and to its token realm); a
    response from elsewhere (blob storage after a redirect) is returned untouched.
    """

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self._home = _origin(httpx.URL(f"{client.scheme}://{client.host}/"))
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
        if basic and self.client.auth is not None:
            return self.client.auth.basic()
        return None

    def sync_auth_flow(
            self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        c = self.client
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
            if c.auth is None:
                raise AuthError(f"registry {c.registry} requires credentials (Basic auth)")
            if cached == c.auth.basic():
                return  # the registry refused them: the caller reports it
            with self._lock:
                self._basic = True
            request.headers["Authorization"] = c.auth.basic()
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
        c = self.client
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
        headers = {"Authorization": c.auth.basic()} if c.auth is not None else {}
        response = yield httpx.Request("GET", url.copy_merge_params(query), headers=headers)
        length = response.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > _MAX_MANIFEST:
            raise RegistryError(f"registry {c.registry}: token response of {length!r:.20} bytes")
        body = response.read()  # (httpx reads it again after the flow: it must stay whole)
        if response.status_code in (401, 403):
            who = f"user {c.auth.username!r}" if c.auth else "anonymous access"
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


def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """Up to ``limit + 1`` body bytes (so the caller can tell "too large")."""
    buf = bytearray()
    for chunk in response.iter_bytes():
        buf += chunk
        if len(buf) > limit:
            break
    return bytes(buf[:limit + 1])


class RegistryClient:
    """Talks to one registry host; thread-safe (one connection pool shared by threads).

    Nothing is sent before the first request; bad arguments raise at once.

    Example::

        >>> client = RegistryClient("127.0.0.1:5000", insecure=True, retries=2)
        >>> client.scheme, client.host
        ('http', '127.0.0.1:5000')
        >>> client.close()

    With TLS and credentials (``ca_certs`` may be a path, PEM bytes or a list)::

        c = RegistryClient("registry.local:5443", auth=RegistryAuth("u", "p"), ca_certs="ca.pem")
        with open("blob", "wb") as f:
            c.fetch_blob("team/app", "sha256:...", f)
    """

    def __init__(
        self,
        registry: str,
        *,
        auth: RegistryAuth | tuple[str, str] | None = None,
        insecure: bool = False,
        ca_certs: CaCerts | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.2,
        api_host: str | None = None,
    ) -> None:
        for what, host in (("registry", registry), ("api_host", api_host)):
            if host is not None and (not isinstance(host, str) or not _HOST.match(host)):
                raise InvalidReferenceError(
                    f"bad {what} {host!r:.80}: use a host name or IP, optionally with :port")
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise RootfsError(f"bad timeout {timeout!r}: use seconds in (0, 3600]")
        if not isinstance(retries, int) or not 0 <= retries <= 20:
            raise RootfsError(f"bad retries {retries!r}: use an integer from 0 to 20")
        if not isinstance(backoff, (int, float)) or not 0 <= backoff <= 60:
            raise RootfsError(f"bad backoff {backoff!r}: use seconds from 0 to 60")
        if isinstance(auth, tuple):
            if len(auth) != 2 or not all(isinstance(a, str) for a in auth):
                raise AuthError("bad auth tuple: use (username, password) strings")
            auth = RegistryAuth(*auth)
        elif auth is not None and not isinstance(auth, RegistryAuth):
            raise AuthError(f"bad auth {type(auth).__name__}: use RegistryAuth or "
                            "(username, password)")
        self.registry = registry
        self.host = api_host or registry
        self.auth = auth if auth is not None else docker_config_auth(registry)
        self.insecure = insecure
        self.scheme = "http" if insecure else "https"
        self.ssl = None if insecure else _ssl_context(ca_certs)  # bad CA files fail here
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._flow = _RegistryAuthFlow(self)
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None

    # -- the HTTP client ---------------------------------------------------
    def _client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                transport = _Transport(lambda: self.ssl or _ssl_context(None),
                                            self.retries, self.backoff)
                self._http = httpx.Client(
                    base_url=f"{self.scheme}://{self.host}",
                    auth=self._flow,
                    transport=transport,
                    timeout=httpx.Timeout(self.timeout),
                    follow_redirects=True,
                    max_redirects=_MAX_REDIRECTS,
                    trust_env=False,
                    # identity: digests are over the bytes as stored, never a re-encoding
                    headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                    event_hooks={"response": [self._check_redirect]},
                )
            return self._http

    def _check_redirect(self, response: httpx.Response) -> None:
        if not response.has_redirect_location:
            return
        location = response.headers["location"]
        try:
            target = response.url.join(location)
        except httpx.InvalidURL:
            raise RegistryError(f"registry {self.registry}: bad redirect to {location!r:.120}")
        if target.scheme not in ("http", "https") or \
                (target.scheme == "http" and self.scheme == "https"):
            raise RegistryError(f"registry {self.registry}: refusing redirect to {location!r:.120}")

    def close(self) -> None:
        """Close the connection pool (the next request opens a new one).

        Example::

            >>> RegistryClient("127.0.0.1:5000", insecure=True).close()
        """
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()

    # -- requests ----------------------------------------------------------
    def _open(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        request = self._client().build_request("GET", path, headers=headers)
        try:
            response = self._client().send(request, stream=True)
        except httpx.TooManyRedirects:
            raise RegistryError(f"registry {self.registry}: more than {_MAX_REDIRECTS} "
                                f"redirects for {path}") from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, request.url) from None
        if response.status_code in (401, 403):
            response.close()
            who = f"user {self.auth.username!r}" if self.auth else "anonymous access"
            raise AuthError(f"registry {self.registry} denied {who} for {path} "
                            f"(HTTP {response.status_code})")
        return response

    def _transport_error(self, exc: httpx.HTTPError, url: httpx.URL) -> RegistryError:
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

    def get_manifest(self, repository: str, selector: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index; return (body, media type, verified digest).

        ``selector`` is a tag or a digest. Example::

            body, mt, digest = client.get_manifest("library/alpine", "3.19")

        A bad repository, tag or digest raises before any request::

            >>> RegistryClient("127.0.0.1:9", insecure=True).get_manifest("Team/App", "v1")
            Traceback (most recent call last):
            ...
            rootfs.errors.InvalidReferenceError: bad repository 'Team/App': use lowercase path components like 'team/app'
        """
        _check_repository(repository)
        if not isinstance(selector, str):
            raise InvalidReferenceError(f"bad tag or digest {selector!r:.80}")
        if ":" in selector:
            validate_digest(selector)
        elif not _TAG.match(selector):
            raise InvalidReferenceError(
                f"bad tag {selector!r:.80}: use up to 128 of [A-Za-z0-9_.-], not starting "
                "with . or -")
        shown = _named(repository, selector)
        with closing(self._open(f"/v2/{repository}/manifests/{selector}",
                                {"Accept": ACCEPT_MANIFESTS})) as resp:
            try:
                body = _read_capped(resp, _MAX_MANIFEST)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, resp.request.url) from None
        if resp.status_code == 404:
            raise ImageNotFoundError(f"{self.registry}/{shown} not found in the registry")
        if resp.status_code != 200:
            raise RegistryError(f"registry {self.registry}: manifest {shown} "
                                f"-> HTTP {resp.status_code}: {body[:200]!r}")
        if len(body) > _MAX_MANIFEST:
            raise RegistryError(f"manifest {shown} larger than {_MAX_MANIFEST}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if selector.startswith("sha256:") and digest != selector:
            raise DigestError(f"manifest {repository}@{selector} has digest {digest}")
        mt = resp.headers.get("content-type", "").split(";")[0].strip()
        return body, mt, digest

    def fetch_blob(self, repository: str, digest: str, out: BinaryIO, *, size: int | None = None,
                   progress: ProgressFn | None = None) -> int:
        """Stream blob ``digest`` into ``out``, verifying it; return the byte count.

        Memory stays bounded (network-sized chunks). Raises :class:`DigestError` on a
        mismatch and :class:`RegistryError` when the connection breaks mid-blob (the
        caller discards ``out`` and may try again).

        Example::

            with open("tmp", "wb") as f:
                client.fetch_blob("busybox", layer.digest, f, size=layer.size)

        A malformed digest raises before any request::

            >>> import io
            >>> RegistryClient("127.0.0.1:9", insecure=True).fetch_blob("a", "md5:00", io.BytesIO())
            Traceback (most recent call last):
            ...
            rootfs.errors.DigestError: bad digest 'md5:00': algorithm must be one of sha256, sha512
        """
        _check_repository(repository)
        validate_digest(digest)
        if size is not None and (not isinstance(size, int) or size < 0):
            raise RootfsError(f"bad blob size {size!r}: use a byte count >= 0 or None")
        with closing(self._open(f"/v2/{repository}/blobs/{digest}")) as resp:
            if resp.status_code == 404:
                raise ImageNotFoundError(f"blob {digest} not found in {self.registry}/{repository}")
            if resp.status_code != 200:
                try:
                    body = _read_capped(resp, 512)
                except httpx.HTTPError:
                    body = b""
                raise RegistryError(f"registry {self.registry}: blob {digest} -> "
                                    f"HTTP {resp.status_code}: {body[:200]!r}")
            length = resp.headers.get("content-length", "")
            advertised = int(length) if length.isdigit() else None
            done = self._stream(resp, digest, out, size, advertised, progress)
        if size is not None and done != size:
            raise DigestError(f"blob {digest}: {done} bytes, descriptor says {size}")
        return done

    def _stream(self, resp: httpx.Response, digest: str, out: BinaryIO, size: int | None,
                advertised: int | None, progress: ProgressFn | None) -> int:
        algo = digest.partition(":")[0]
        sha = hashlib.new(algo)
        done = 0
        total = size if size is not None else (advertised or 0)
        try:
            for chunk in resp.iter_raw():
                done += len(chunk)
                if size is not None and done > size:
                    raise DigestError(f"blob {digest} is larger than its descriptor size {size}")
                sha.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(digest, done, total)
        except httpx.HTTPError as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RegistryError(f"download of blob {digest} failed: {detail}") from None
        expected = size if size is not None else advertised
        if expected is not None and done < expected:
            raise RegistryError(
                f"download of blob {digest} stopped after {done} of {expected} bytes")
        got = f"{algo}:{sha.hexdigest()}"
        if got != digest:
            raise DigestError(f"blob digest mismatch: expected {digest}, got {got}")
        return done


def _check_repository(repository: object) -> None:
    if not isinstance(repository, str) or not repository or repository.startswith("/") or \
            any(not _COMPONENT.match(c) for c in repository.split("/")):
        raise InvalidReferenceError(
            f"bad repository {repository!r:.80}: use lowercase path components like 'team/app'")
