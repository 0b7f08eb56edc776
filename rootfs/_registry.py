"""A small native OCI distribution (registry v2) client: manifests and blobs.

Ours: media-type negotiation for manifests and indexes, credentials from
``~/.docker/config.json`` as a fallback, TLS with extra CA certificates (the
system's trust store otherwise), plain HTTP only when ``insecure``, bad input refused
before any request, typed one-line errors (:mod:`rootfs.errors`), and every byte
checked against its digest while a blob streams to disk in bounded memory.

The HTTP side (connection pool, retries, redirects without leaking credentials,
Bearer/Basic auth as an :class:`httpx.Auth` flow) is :mod:`httpx`, in
:mod:`rootfs._registry_http`.

Example::

    client = RegistryClient("127.0.0.1:5000", insecure=True)
    body, media_type, digest = client.get_manifest("busybox", "latest")
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rootfs._image import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from rootfs._reference import _COMPONENT, _HOST, _TAG, DEFAULT_REGISTRY, validate_digest
from rootfs._registry_http import Session
from rootfs.errors import (
    AuthError,
    DigestError,
    ImageNotFoundError,
    InvalidReferenceError,
    RegistryError,
    RootfsError,
)

ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
_MAX_MANIFEST = 4 << 20

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


def _named(repository: str, selector: str) -> str:
    """``repo:tag`` or ``repo@sha256:...`` (a digest selector is pinned with ``@``)."""
    return f"{repository}@{selector}" if ":" in selector else f"{repository}:{selector}"


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
        self._lock = threading.Lock()
        self._session: Session | None = None

    # -- the HTTP side -----------------------------------------------------
    def _http(self) -> Session:
        with self._lock:
            if self._session is None:
                auth = self.auth
                self._session = Session(
                    self.registry, self.scheme, self.host,
                    username=auth.username if auth is not None else None,
                    basic=auth.basic() if auth is not None else None,
                    ssl_context=lambda: self.ssl or _ssl_context(None),
                    timeout=self.timeout, retries=self.retries, backoff=self.backoff)
            return self._session

    def close(self) -> None:
        """Close the connection pool (the next request opens a new one).

        Example::

            >>> RegistryClient("127.0.0.1:5000", insecure=True).close()
        """
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close()

    # -- requests ----------------------------------------------------------
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
        http = self._http()
        with closing(http.open(f"/v2/{repository}/manifests/{selector}",
                               {"Accept": ACCEPT_MANIFESTS})) as resp:
            body = http.read(resp, _MAX_MANIFEST)
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
        http = self._http()
        with closing(http.open(f"/v2/{repository}/blobs/{digest}")) as resp:
            if resp.status_code == 404:
                raise ImageNotFoundError(f"blob {digest} not found in {self.registry}/{repository}")
            if resp.status_code != 200:
                try:
                    body = http.read(resp, 512)
                except RegistryError:
                    body = b""
                raise RegistryError(f"registry {self.registry}: blob {digest} -> "
                                    f"HTTP {resp.status_code}: {body[:200]!r}")
            length = resp.headers.get("content-length", "")
            advertised = int(length) if length.isdigit() else None
            done = self._stream(http.chunks(resp, f"blob {digest}"), digest, out, size,
                                advertised, progress)
        if size is not None and done != size:
            raise DigestError(f"blob {digest}: {done} bytes, descriptor says {size}")
        return done

    def _stream(self, chunks: Iterator[bytes], digest: str, out: BinaryIO, size: int | None,
                advertised: int | None, progress: ProgressFn | None) -> int:
        algo = digest.partition(":")[0]
        sha = hashlib.new(algo)
        done = 0
        total = size if size is not None else (advertised or 0)
        for chunk in chunks:
            done += len(chunk)
            if size is not None and done > size:
                raise DigestError(f"blob {digest} is larger than its descriptor size {size}")
            sha.update(chunk)
            out.write(chunk)
            if progress is not None:
                progress(digest, done, total)
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
