"""A small native OCI distribution (registry v2) client: manifests and blobs.

Token (Bearer) and Basic auth, ``~/.docker/config.json`` credentials as a
fallback, TLS with extra CA certificates, plain HTTP only when ``insecure``,
retries with exponential backoff on transient failures (connection errors, 429,
5xx), and every byte verified against its digest.

Example::

    client = RegistryClient("127.0.0.1:5000", insecure=True)
    body, media_type, digest = client.get_manifest("busybox", "latest")
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rootfs.errors import AuthError, DigestError, ImageNotFoundError, RegistryError
from rootfs.image import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from rootfs.reference import DEFAULT_REGISTRY

ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
USER_AGENT = "microvm-sandbox-rootfs/0.1"
_CHUNK = 1 << 20
_MAX_MANIFEST = 4 << 20
_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}

ProgressFn = Callable[[str, int, int], None]
"""``progress(layer_digest, bytes_done, bytes_total)``."""


@dataclass(frozen=True)
class RegistryAuth:
    """Username and password (or token as password) for one registry.

    Example::

        RegistryAuth("alice", "s3cret")
    """

    username: str
    password: str

    def __repr__(self) -> str:
        return f"RegistryAuth(username={self.username!r}, password=***)"


CaCerts = str | os.PathLike[str] | bytes | Sequence[str | os.PathLike[str] | bytes]


def docker_config_auth(registry: str, config_dir: Path | None = None) -> RegistryAuth | None:
    """Credentials for ``registry`` from ``$DOCKER_CONFIG/config.json`` (``auths`` only).

    Example::

        docker_config_auth("127.0.0.1:5000")
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


def _ssl_context(ca_certs: CaCerts | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_certs is None:
        return ctx
    items: Sequence[str | os.PathLike[str] | bytes]
    items = [ca_certs] if isinstance(ca_certs, (str, bytes, os.PathLike)) else ca_certs
    for item in items:
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


class _Response:
    def __init__(self, status: int, headers: dict[str, str], resp: http.client.HTTPResponse,
                 conn: http.client.HTTPConnection) -> None:
        self.status = status
        self.headers = headers
        self.resp = resp
        self.conn = conn


def _named(repository: str, selector: str) -> str:
    """``repo:tag`` or ``repo@sha256:...`` (a digest selector is pinned with ``@``)."""
    return f"{repository}@{selector}" if ":" in selector else f"{repository}:{selector}"


class RegistryClient:
    """Talks to one registry host; thread-safe (one connection per thread).

    Example::

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
        self.registry = registry
        self.host = api_host or registry
        if isinstance(auth, tuple):
            auth = RegistryAuth(*auth)
        self.auth = auth if auth is not None else docker_config_auth(registry)
        self.scheme = "http" if insecure else "https"
        self.ssl = None if insecure else _ssl_context(ca_certs)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._lock = threading.Lock()
        self._local = threading.local()

    # -- connections -------------------------------------------------------
    def _conn(self, scheme: str, host: str) -> http.client.HTTPConnection:
        pool: dict[tuple[str, str], http.client.HTTPConnection] = getattr(self._local, "pool", {})
        self._local.pool = pool
        conn = pool.get((scheme, host))
        if conn is None:
            if scheme == "https":
                ctx = self.ssl or _ssl_context(None)
                conn = http.client.HTTPSConnection(host, timeout=self.timeout, context=ctx)
            else:
                conn = http.client.HTTPConnection(host, timeout=self.timeout)
            pool[(scheme, host)] = conn
        return conn

    def _drop(self, scheme: str, host: str) -> None:
        pool = getattr(self._local, "pool", {})
        conn = pool.pop((scheme, host), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close this thread's connections.

        Example::

            client.close()
        """
        for conn in getattr(self._local, "pool", {}).values():
            conn.close()
        self._local.pool = {}

    # -- auth --------------------------------------------------------------
    def _auth_header(self, scope: str) -> dict[str, str]:
        with self._lock:
            token = self._tokens.get(scope)
            basic = self._basic
        if token:
            return {"Authorization": f"Bearer {token}"}
        if basic and self.auth is not None:
            return {"Authorization": "Basic " + self._basic_value()}
        return {}

    def _basic_value(self) -> str:
        assert self.auth is not None
        raw = f"{self.auth.username}:{self.auth.password}".encode()
        return base64.b64encode(raw).decode()

    def _authenticate(self, challenge: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.auth is None:
                raise AuthError(f"registry {self.registry} requires credentials (Basic auth)")
            with self._lock:
                if self._basic:
                    raise AuthError(f"registry {self.registry} rejected the credentials of "
                                    f"user {self.auth.username!r}")
                self._basic = True
            return
        if scheme != "bearer" or "realm" not in params:
            raise AuthError(f"registry {self.registry}: unsupported auth challenge {challenge!r}")
        query = {"scope": params.get("scope") or scope}
        if params.get("service"):
            query["service"] = params["service"]
        realm = params["realm"]
        url = urllib.parse.urlsplit(realm)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise AuthError(f"registry {self.registry}: bad token realm {realm!r}")
        if url.scheme == "http" and self.scheme == "https":
            raise AuthError(f"registry {self.registry}: refusing a plain-http token realm {realm!r}")
        target = (url.path or "/") + "?" + (url.query + "&" if url.query else "")
        target += urllib.parse.urlencode(query)
        headers = {}
        if self.auth is not None:
            headers["Authorization"] = "Basic " + self._basic_value()
        resp = self._request_raw("GET", url.scheme, url.netloc, target, headers)
        body = resp.resp.read(_MAX_MANIFEST)
        if resp.status in (401, 403):
            who = f"user {self.auth.username!r}" if self.auth else "anonymous access"
            raise AuthError(f"registry {self.registry}: token server refused {who} "
                            f"(HTTP {resp.status})")
        if resp.status != 200:
            raise RegistryError(f"registry {self.registry}: token server said HTTP {resp.status}")
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"registry {self.registry}: token server returned no token")
        with self._lock:
            self._tokens[scope] = token

    # -- requests ----------------------------------------------------------
    def _request_raw(self, method: str, scheme: str, host: str, target: str,
                     headers: dict[str, str]) -> _Response:
        hdrs = {"User-Agent": USER_AGENT, **headers}
        attempt = 0
        while True:
            conn = self._conn(scheme, host)
            try:
                conn.request(method, target, headers=hdrs)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(scheme, host)
                if isinstance(exc, ssl.SSLCertVerificationError):
                    what = f"TLS verification of {host} failed: {exc.verify_message}"
                    raise RegistryError(
                        f"{what} (pass ca_certs=, or insecure=True for plain HTTP)",
                        cli_message=f"{what} (pass --ca-certs, or --insecure for plain HTTP)",
                    ) from None
                if isinstance(exc, ssl.SSLError):
                    what = f"TLS handshake with {host} failed: {exc.reason or exc}"
                    raise RegistryError(
                        f"{what} (is it a plain-HTTP registry? then pass insecure=True)",
                        cli_message=f"{what} (is it a plain-HTTP registry? then pass "
                                    "--insecure)",
                    ) from None
                if attempt >= self.retries:
                    raise RegistryError(f"{method} {scheme}://{host}{target} failed: {exc}") from None
                time.sleep(self.backoff * (2 ** attempt))
                attempt += 1
                continue
            if resp.status in _TRANSIENT and attempt < self.retries:
                resp.read()
                retry_after = resp.getheader("Retry-After")
                delay = self.backoff * (2 ** attempt)
                if retry_after and retry_after.isdigit():
                    delay = min(float(retry_after), 30.0)
                time.sleep(delay)
                attempt += 1
                continue
            headers_out = {k.lower(): v for k, v in resp.getheaders()}
            return _Response(resp.status, headers_out, resp, conn)

    def _request(self, method: str, path: str, scope: str,
                 headers: dict[str, str] | None = None) -> _Response:
        scheme, host, target = self.scheme, self.host, path
        tried_auth = False
        redirects = 0
        same_origin = True
        while True:
            hdrs = dict(headers or {})
            if same_origin:
                hdrs.update(self._auth_header(scope))
            resp = self._request_raw(method, scheme, host, target, hdrs)
            if resp.status == 401 and same_origin and not tried_auth:
                resp.resp.read()
                challenge = resp.headers.get("www-authenticate")
                if not challenge:
                    raise AuthError(f"registry {self.registry}: HTTP 401 without a challenge")
                self._authenticate(challenge, scope)
                tried_auth = True
                continue
            if resp.status in (301, 302, 303, 307, 308):
                resp.resp.read()
                loc = resp.headers.get("location")
                redirects += 1
                if not loc or redirects > 5:
                    raise RegistryError(f"registry {self.registry}: bad redirect for {path}")
                url = urllib.parse.urlsplit(urllib.parse.urljoin(f"{scheme}://{host}{target}", loc))
                if url.scheme == "http" and self.scheme == "https":
                    raise RegistryError(f"registry {self.registry}: refusing redirect to {loc!r}")
                same_origin = (url.scheme, url.netloc) == (self.scheme, self.host)
                scheme, host = url.scheme, url.netloc
                target = (url.path or "/") + (f"?{url.query}" if url.query else "")
                continue
            if resp.status in (401, 403):
                resp.resp.read()
                who = f"user {self.auth.username!r}" if self.auth else "anonymous access"
                raise AuthError(f"registry {self.registry} denied {who} for {path} "
                                f"(HTTP {resp.status})")
            return resp

    def get_manifest(self, repository: str, selector: str) -> tuple[bytes, str, str]:
        """Fetch a manifest or index; return (body, media type, verified digest).

        Example::

            body, mt, digest = client.get_manifest("library/alpine", "3.19")
        """
        scope = f"repository:{repository}:pull"
        resp = self._request("GET", f"/v2/{repository}/manifests/{selector}", scope,
                             {"Accept": ACCEPT_MANIFESTS})
        body = resp.resp.read(_MAX_MANIFEST + 1)
        shown = _named(repository, selector)
        if resp.status == 404:
            raise ImageNotFoundError(f"{self.registry}/{shown} not found in the registry")
        if resp.status != 200:
            raise RegistryError(f"registry {self.registry}: manifest {shown} "
                                f"-> HTTP {resp.status}: {body[:200]!r}")
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

        Raises :class:`DigestError` on mismatch (the caller discards ``out``).

        Example::

            with open("tmp", "wb") as f:
                client.fetch_blob("busybox", layer.digest, f, size=layer.size)
        """
        scope = f"repository:{repository}:pull"
        resp = self._request("GET", f"/v2/{repository}/blobs/{digest}", scope)
        if resp.status == 404:
            resp.resp.read()
            raise ImageNotFoundError(f"blob {digest} not found in {self.registry}/{repository}")
        if resp.status != 200:
            body = resp.resp.read(512)
            raise RegistryError(f"registry {self.registry}: blob {digest} -> HTTP {resp.status}: "
                                f"{body[:200]!r}")
        algo = digest.partition(":")[0]
        sha = hashlib.new(algo)
        done = 0
        total = size if size is not None else int(resp.headers.get("content-length") or 0)
        try:
            while True:
                chunk = resp.resp.read(_CHUNK)
                if not chunk:
                    break
                sha.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if size is not None and done > size:
                    raise DigestError(f"blob {digest} is larger than its descriptor size {size}")
                if progress is not None:
                    progress(digest, done, total)
        except (OSError, http.client.HTTPException) as exc:
            resp.conn.close()  # http.client reopens it on the next request
            raise RegistryError(f"download of blob {digest} failed: {exc}") from None
        expected = size if size is not None else int(resp.headers.get("content-length") or -1)
        if 0 <= done < expected:
            resp.conn.close()
            raise RegistryError(
                f"download of blob {digest} stopped after {done} of {expected} bytes")
        got = f"{algo}:{sha.hexdigest()}"
        if got != digest:
            raise DigestError(f"blob digest mismatch: expected {digest}, got {got}")
        if size is not None and done != size:
            raise DigestError(f"blob {digest}: {done} bytes, descriptor says {size}")
        return done
