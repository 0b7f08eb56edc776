"""The registry client's HTTP side against real servers: redirects, auth, retries, bad input.

Images live in Debian's docker-registry (plain HTTP). In front of it, a small real
HTTP server in this process ("front") plays a registry the way hosted ones behave:
Basic or Bearer auth (with its own token endpoint), blobs redirected to a storage
host on another port (which records what reached it), and misbehaviour on demand
(connection resets, endless redirects, a redirect from https to http).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import rootfs
from rootfs import RegistryClient
from tests.rootfs._layers import base_layers
from tests.rootfs._registry import Registry

USER, PASSWORD = "carol", "s3cret-pass"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
TOKEN = "tok-" + "x" * 20


@dataclass
class Front:
    """Settings and observations of one front server (shared with its handler threads)."""

    backend: int  # docker-registry port
    auth: str = "none"  # none | basic | bearer
    redirect_blobs: bool = True
    redirect_loop: bool = False
    storage_url: str = ""
    realm: str = ""  # bearer: token endpoint URL (default: our own /token)
    challenge: str | None = None  # a fixed 401 challenge to send instead
    token_body: bytes | None = None  # what /token answers (default: a token)
    resets: int = 0  # reset (RST) this many connections before answering
    drop_idle: bool = False  # close each connection after its response (no "Connection: close")
    stall: bool = False  # read requests, never answer
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization)
    storage_seen: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the client sees ECONNRESET."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    front: Front

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FrontHandler(_Handler):
    def do_GET(self) -> None:
        f = self.front
        with f.lock:
            if f.resets > 0:
                f.resets -= 1
                reset = True
            else:
                reset = False
                f.seen.append((self.path, self.headers.get("Authorization")))
        if reset:
            self.close_connection = True
            _reset(self.connection)
            return
        if f.stall:
            self.close_connection = True
            time.sleep(2)
            return
        if f.drop_idle:
            self.close_connection = True  # the client learns it only on its next request
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/token":
            if self.headers.get("Authorization") != BASIC:
                self._send(401, b"{}")
                return
            self._send(200, f.token_body if f.token_body is not None
                       else json.dumps({"token": TOKEN}).encode(),
                       {"Content-Type": "application/json"})
            return
        if f.redirect_loop:
            self._send(302, headers={"Location": self.path})
            return
        if not self._authorized():
            return
        if f.redirect_blobs and "/blobs/" in url.path:
            digest = url.path.rsplit("/", 1)[1]
            self._send(307, headers={"Location": f"{f.storage_url}/store/{digest}?sig=abc"})
            return
        self._proxy(self.path)

    def _authorized(self) -> bool:
        f = self.front
        got = self.headers.get("Authorization")
        if f.auth == "none":
            return True
        if f.auth == "basic" and got == BASIC:
            return True
        if f.auth == "bearer" and got == f"Bearer {TOKEN}":
            return True
        if f.challenge is not None:
            challenge = f.challenge
        elif f.auth == "basic":
            challenge = 'Basic realm="front"'
        else:
            host = self.headers.get("Host")
            realm = f.realm or f"{'https' if isinstance(self.connection, ssl.SSLSocket) else 'http'}://{host}/token"
            repo = self.path.split("/v2/", 1)[1].rsplit("/", 2)[0]
            challenge = f'Bearer realm="{realm}",service="front",scope="repository:{repo}:pull"'
        headers = {"WWW-Authenticate": challenge} if challenge else {}
        self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', headers)
        return False

    def _proxy(self, path: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.front.backend, timeout=30)
        try:
            hdrs = {k: v for k, v in self.headers.items() if k.lower() == "accept"}
            conn.request("GET", path, headers=hdrs)
            resp = conn.getresponse()
            body = resp.read()
            keep = {k: v for k, v in resp.getheaders()
                    if k.lower() in ("content-type", "docker-content-digest")}
            self._send(resp.status, body, keep)
        finally:
            conn.close()


class StorageHandler(_Handler):
    """Blob storage on another origin: serves /store/<digest> from the backend registry."""

    def do_GET(self) -> None:
        f = self.front
        with f.lock:
            f.storage_seen.append((self.path, self.headers.get("Authorization")))
        digest = urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[1]
        conn = http.client.HTTPConnection("127.0.0.1", f.backend, timeout=30)
        try:
            # any repository works for a digest the backend holds: the registry's blobs
            # are content-addressed; use the one the test pushed
            conn.request("GET", f"/v2/{self.server.repo}/blobs/{digest}")  # type: ignore[attr-defined]
            resp = conn.getresponse()
            self._send(resp.status, resp.read(), {"Content-Type": "application/octet-stream"})
        finally:
            conn.close()


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a thread (optionally TLS)."""

    def __init__(self, handler: type[_Handler], front: Front, *, repo: str = "",
                 tls: ssl.SSLContext | None = None) -> None:
        cls = type("H", (handler,), {"front": front})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), cls)
        self.httpd.daemon_threads = True
        self.httpd.repo = repo  # type: ignore[attr-defined]
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def pushed(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, rootfs.Image]:
    """The backend registry holds front/app:v1 (three layers); its image in a source store."""
    src = rootfs.ImageStore(tmp_path_factory.mktemp("http-src"))
    img = rootfs.image_from_layers(src, "local/front:1", base_layers())
    out = tmp_path_factory.mktemp("http-layout") / "oci"
    rootfs.write_oci_layout(src, out, {"v1": img})
    registry.push(out, "v1", "front/app")
    return "front/app", img


@pytest.fixture
def servers(registry: Registry, pushed: tuple[str, rootfs.Image]) -> Iterator[tuple[Front, Server]]:
    """A front (no auth, blobs redirected) and its storage server; both closed afterwards."""
    front = Front(backend=registry.port)
    storage = Server(StorageHandler, front, repo=pushed[0])
    front.storage_url = f"http://{storage.host}"
    srv = Server(FrontHandler, front)
    try:
        yield front, srv
    finally:
        srv.close()
        storage.close()


def _pull(tmp_path: Path, host: str, **kw: Any) -> rootfs.Image:
    return rootfs.ImageStore(tmp_path / "store").pull(f"{host}/front/app:v1", **kw)


@pytest.fixture(autouse=True)
def _no_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


@pytest.mark.parametrize("auth", ["none", "basic", "bearer"])
def test_blob_redirect_to_storage_never_carries_credentials(
        servers: tuple[Front, Server], pushed: tuple[str, rootfs.Image], tmp_path: Path,
        auth: str) -> None:
    front, srv = servers
    front.auth = auth
    img = _pull(tmp_path, srv.host, insecure=True,
                auth=None if auth == "none" else (USER, PASSWORD))
    assert img.digest == pushed[1].digest
    blobs = {ly.digest for ly in pushed[1].layers} | {pushed[1].config_digest}
    assert {p.split("/store/")[1].split("?")[0] for p, _ in front.storage_seen} == blobs
    assert all(a is None for _, a in front.storage_seen)  # no Authorization left the registry
    v2 = [a for p, a in front.seen if p.startswith("/v2/")]
    want = {"none": None, "basic": BASIC, "bearer": f"Bearer {TOKEN}"}[auth]
    assert v2[-1] == want  # ... and it did reach the registry itself
    if auth == "bearer":  # one token for the repository, reused for every request
        tokens = [urllib.parse.urlsplit(p) for p, _ in front.seen if p.startswith("/token")]
        assert len(tokens) == 1
        assert urllib.parse.parse_qs(tokens[0].query) == {
            "scope": ["repository:front/app:pull"], "service": ["front"]}


def test_https_registry_is_never_redirected_to_plain_http(
        registry: Registry, pushed: tuple[str, rootfs.Image], tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    front = Front(backend=registry.port)
    storage = Server(StorageHandler, front, repo=pushed[0])
    front.storage_url = f"http://{storage.host}"
    srv = Server(FrontHandler, front, tls=ctx)
    try:
        ca_pem = ca.cert_pem.bytes()
        with pytest.raises(rootfs.RegistryError, match="refusing redirect to 'http://127") as ei:
            _pull(tmp_path, srv.host, ca_certs=ca_pem)
        assert "\n" not in str(ei.value)
        assert front.storage_seen == []
        # a token realm on plain http is refused the same way (it would see the password)
        front.auth, front.realm = "bearer", f"http://{storage.host}/token"
        with pytest.raises(rootfs.AuthError, match="refusing a plain-http token realm"):
            _pull(tmp_path, srv.host, ca_certs=ca_pem, auth=(USER, PASSWORD))
        # https redirects and an https realm are fine
        front.realm = ""
        front.redirect_blobs = False
        img = _pull(tmp_path, srv.host, ca_certs=ca_pem, auth=(USER, PASSWORD))
        assert img.digest == pushed[1].digest
    finally:
        srv.close()
        storage.close()


def test_endless_redirects_fail_in_one_line(servers: tuple[Front, Server],
                                            tmp_path: Path) -> None:
    front, srv = servers
    front.redirect_loop = True
    with pytest.raises(rootfs.RegistryError, match=r"more than 5 redirects for "
                                                   r"/v2/front/app/manifests/v1") as ei:
        _pull(tmp_path, srv.host, insecure=True)
    assert "\n" not in str(ei.value)
    assert len(front.seen) == 6


def test_connection_resets_are_retried(servers: tuple[Front, Server],
                                       pushed: tuple[str, rootfs.Image],
                                       tmp_path: Path) -> None:
    front, srv = servers
    front.resets = 3
    img = _pull(tmp_path, srv.host, insecure=True)
    assert img.digest == pushed[1].digest and front.resets == 0


def test_retries_give_up_with_a_one_line_error(servers: tuple[Front, Server],
                                               tmp_path: Path) -> None:
    front, srv = servers
    front.resets = 100
    client = RegistryClient(srv.host, insecure=True, retries=2, backoff=0)
    with pytest.raises(rootfs.RegistryError,
                       match=rf"GET http://{srv.host}/v2/front/app/manifests/v1 failed") as ei:
        client.get_manifest("front/app", "v1")
    assert "\n" not in str(ei.value)
    assert front.resets == 100 - 3  # one try and two retries


def test_kept_alive_connection_closed_by_the_server_is_replaced(
        servers: tuple[Front, Server], pushed: tuple[str, rootfs.Image]) -> None:
    front, srv = servers
    front.drop_idle = True
    client = RegistryClient(srv.host, insecure=True, retries=0)  # no retry to lean on
    for _ in range(3):
        assert client.get_manifest("front/app", "v1")[2] == pushed[1].digest
    client.close()
    assert len(front.seen) == 3


def test_a_server_that_never_answers_times_out(servers: tuple[Front, Server]) -> None:
    front, srv = servers
    front.stall = True
    client = RegistryClient(srv.host, insecure=True, timeout=0.3, retries=1, backoff=0)
    with pytest.raises(rootfs.RegistryError, match="manifests/v1 failed: ") as ei:
        client.get_manifest("front/app", "v1")
    assert "\n" not in str(ei.value)
    assert len(front.seen) == 2  # one try, one retry


@pytest.mark.parametrize("challenge,token_body,needle", [
    ("", None, "HTTP 401 without a challenge"),
    ('Negotiate realm="x"', None, "unsupported auth challenge 'Negotiate"),
    ('Bearer service="x"', None, "unsupported auth challenge"),
    ('Bearer realm="ftp://127.0.0.1/token"', None, "bad token realm 'ftp://"),
    (None, b'{"nothing": 1}', "token server returned no token"),
    (None, b"not json", "token server returned no token"),
])
def test_broken_auth_servers_fail_typed(servers: tuple[Front, Server], tmp_path: Path,
                                        challenge: str | None, token_body: bytes | None,
                                        needle: str) -> None:
    front, srv = servers
    front.auth, front.challenge, front.token_body = "bearer", challenge, token_body
    with pytest.raises(rootfs.AuthError, match=needle) as ei:
        _pull(tmp_path, srv.host, insecure=True, auth=(USER, PASSWORD))
    assert "\n" not in str(ei.value)


def test_basic_auth_wrong_and_missing_credentials(servers: tuple[Front, Server],
                                                  tmp_path: Path) -> None:
    front, srv = servers
    front.auth = "basic"
    with pytest.raises(rootfs.AuthError, match=f"denied user '{USER}'"):
        _pull(tmp_path, srv.host, insecure=True, auth=(USER, "wrong"))
    with pytest.raises(rootfs.AuthError, match="requires credentials"):
        _pull(tmp_path, srv.host, insecure=True)
    # the password never appears in an error or a repr
    assert PASSWORD not in repr(rootfs.RegistryAuth(USER, PASSWORD))


def test_blob_stream_is_bounded_and_verified(servers: tuple[Front, Server],
                                             pushed: tuple[str, rootfs.Image]) -> None:
    _front, srv = servers
    client = RegistryClient(srv.host, insecure=True)
    ly = pushed[1].layers[0]
    out = io.BytesIO()
    assert client.fetch_blob("front/app", ly.digest, out, size=ly.size) == ly.size
    with pytest.raises(rootfs.DigestError, match="larger than its descriptor size 3"):
        client.fetch_blob("front/app", ly.digest, io.BytesIO(), size=3)
    with pytest.raises(rootfs.RegistryError, match=f"stopped after {ly.size} of {ly.size + 1}"):
        client.fetch_blob("front/app", ly.digest, io.BytesIO(), size=ly.size + 1)
    missing = "sha256:" + "0" * 64
    with pytest.raises(rootfs.ImageNotFoundError, match=f"blob {missing} not found"):
        client.fetch_blob("front/app", missing, io.BytesIO())
    client.close()
    # a closed client opens a new pool on its next request
    assert client.get_manifest("front/app", "v1")[2] == pushed[1].digest


BAD_CALLS: list[tuple[str, Any, type[Exception], str]] = [
    ("registry", lambda h: RegistryClient("bad host"), rootfs.InvalidReferenceError,
     "bad registry 'bad host'"),
    ("api_host", lambda h: RegistryClient(h, api_host="x/y"), rootfs.InvalidReferenceError,
     "bad api_host 'x/y'"),
    ("timeout", lambda h: RegistryClient(h, timeout=0), rootfs.RootfsError, "bad timeout 0"),
    ("retries", lambda h: RegistryClient(h, retries=-1), rootfs.RootfsError, "bad retries -1"),
    ("backoff", lambda h: RegistryClient(h, backoff=float("nan")), rootfs.RootfsError,
     "bad backoff nan"),
    ("auth", lambda h: RegistryClient(h, auth=("only-user",)), rootfs.AuthError,
     "bad auth tuple"),
    ("ca", lambda h: RegistryClient(h, ca_certs=[42]), rootfs.RegistryError,
     "bad CA certificate item 42"),
    ("repo", lambda h: RegistryClient(h, insecure=True).get_manifest("Team/App", "v1"),
     rootfs.InvalidReferenceError, "bad repository 'Team/App'"),
    ("repo-empty", lambda h: RegistryClient(h, insecure=True).get_manifest("a//b", "v1"),
     rootfs.InvalidReferenceError, "bad repository 'a//b'"),
    ("tag", lambda h: RegistryClient(h, insecure=True).get_manifest("a", "-v1"),
     rootfs.InvalidReferenceError, "bad tag '-v1'"),
    ("digest", lambda h: RegistryClient(h, insecure=True).get_manifest("a", "sha256:abc"),
     rootfs.DigestError, "bad digest 'sha256:abc'"),
    ("blob-digest", lambda h: RegistryClient(h, insecure=True).fetch_blob(
        "a", "md5:00", io.BytesIO()), rootfs.DigestError, "bad digest 'md5:00'"),
    ("blob-size", lambda h: RegistryClient(h, insecure=True).fetch_blob(
        "a", "sha256:" + "0" * 64, io.BytesIO(), size=-1), rootfs.RootfsError,
     "bad blob size -1"),
]


@pytest.mark.parametrize("call,exc,needle", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_refused_before_any_request(call: Any, exc: type[Exception],
                                                 needle: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    try:
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(exc, match=needle) as ei:
            call(host)
        assert "\n" not in str(ei.value)
        with pytest.raises(BlockingIOError):  # nobody connected
            listener.accept()
    finally:
        listener.close()


def test_many_threads_share_one_client(servers: tuple[Front, Server],
                                       pushed: tuple[str, rootfs.Image]) -> None:
    front, srv = servers
    front.auth = "bearer"
    client = RegistryClient(srv.host, insecure=True, auth=(USER, PASSWORD))
    layers = pushed[1].layers
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for ly in layers[i % len(layers):] + layers[:i % len(layers)]:
                out = io.BytesIO()
                client.fetch_blob("front/app", ly.digest, out, size=ly.size)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    client.close()
    assert errors == []
    # at most one token request per thread that raced for the first one; then reuse
    tokens = [p for p, _ in front.seen if p.startswith("/token")]
    assert 1 <= len(tokens) <= 6
