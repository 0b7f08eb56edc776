"""A real Docker registry (Debian's docker-registry) for tests and benchmarks.

Started on 127.0.0.1 with a free port; plain HTTP, TLS with a trustme CA, and
optional htpasswd (bcrypt) auth. Images are pushed with skopeo from OCI layouts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def policy_file(directory: Path) -> Path:
    """A skopeo signature policy that accepts anything (never touches /etc/containers)."""
    p = directory / "policy.json"
    p.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return p


class TokenServer:
    """A Docker token server (JWT with an x5c chain, ES256) over HTTPS for Bearer auth."""

    def __init__(self, root: Path, ca: object, user: str, password: str) -> None:
        import base64
        import http.server
        import ssl
        import threading

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        self.issuer, self.service = "test-issuer", "test-registry"
        signer = ca.issue_cert("token-signer")  # type: ignore[attr-defined]
        key = serialization.load_pem_private_key(signer.private_key_pem.bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        cert = x509.load_pem_x509_certificate(signer.cert_chain_pems[0].bytes())
        x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.bundle = root / "token-ca.pem"
        ca.cert_pem.write_to_path(str(self.bundle))  # type: ignore[attr-defined]
        server_cert = ca.issue_cert("127.0.0.1")  # type: ignore[attr-defined]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_cert.configure_cert(ctx)
        want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        outer = self
        self.requests = 0

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        def mint(scope: str) -> str:
            now = int(time.time())
            access = []
            for sc in scope.split(" "):
                parts = sc.split(":")
                if len(parts) == 3:
                    access.append({"type": parts[0], "name": parts[1],
                                   "actions": parts[2].split(",")})
            header = {"typ": "JWT", "alg": "ES256", "x5c": [x5c]}
            claims = {"iss": outer.issuer, "sub": user, "aud": outer.service, "exp": now + 600,
                      "nbf": now - 60, "iat": now, "jti": os.urandom(8).hex(), "access": access}
            signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
            der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
            r, s_ = decode_dss_signature(der)
            sig = r.to_bytes(32, "big") + s_.to_bytes(32, "big")
            return f"{signing_input}.{b64(sig)}"

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                import urllib.parse as up

                outer.requests += 1
                q = up.parse_qs(up.urlsplit(self.path).query)
                if self.headers.get("Authorization") != want:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"token": mint(" ".join(q.get("scope", [""])))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"https://127.0.0.1:{self.port}/token"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Registry:
    root: Path
    tls: bool = False
    user: str | None = None
    password: str | None = None
    token: bool = False
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    ca_pem: Path | None = None
    cert_dir: Path | None = None
    log: Path | None = None
    _ca: object = field(default=None, repr=False)
    token_server: TokenServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def start(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  secret: test-secret",
        ]
        if self.tls:
            import trustme

            ca = trustme.CA()
            self._ca = ca
            cert = ca.issue_cert("127.0.0.1", "localhost")
            key_path = self.root / "server.key"
            crt_path = self.root / "server.crt"
            cert.private_key_pem.write_to_path(str(key_path))
            cert.cert_chain_pems[0].write_to_path(str(crt_path))
            self.ca_pem = self.root / "ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_pem))
            self.cert_dir = self.root / "certs.d"
            self.cert_dir.mkdir(exist_ok=True)
            shutil.copy(self.ca_pem, self.cert_dir / "ca.crt")
            lines += ["  tls:", f"    certificate: {crt_path}", f"    key: {key_path}"]
        if self.token:
            assert self.tls and self.user is not None
            self.token_server = TokenServer(self.root, self._ca, self.user, self.password or "")
            lines += ["auth:", "  token:", f"    realm: {self.token_server.realm}",
                      f"    service: {self.token_server.service}",
                      f"    issuer: {self.token_server.issuer}",
                      f"    rootcertbundle: {self.token_server.bundle}"]
        elif self.user is not None:
            htpasswd = self.root / "htpasswd"
            subprocess.run(
                ["htpasswd", "-Bbc", str(htpasswd), self.user, self.password or ""],
                check=True, capture_output=True,
            )
            lines += ["auth:", "  htpasswd:", "    realm: test-realm", f"    path: {htpasswd}"]
        config = self.root / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        self.log = self.root / "registry.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config)], stdout=logf, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("registry did not start in 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.token_server is not None:
            self.token_server.stop()
            self.token_server = None

    def push(self, layout: Path, tag: str, repo: str, *, dest_tag: str | None = None,
             all_platforms: bool = False) -> str:
        """skopeo copy oci:LAYOUT:TAG docker://HOST/REPO:DEST_TAG; return the reference."""
        ref = f"{self.host}/{repo}:{dest_tag or tag}"
        argv = ["skopeo", "--policy", str(policy_file(self.root)), "copy", "-q"]
        if all_platforms:
            argv.append("--all")
        if self.tls:
            argv += ["--dest-cert-dir", str(self.cert_dir)]
        else:
            argv.append("--dest-tls-verify=false")
        if self.user is not None:
            argv += ["--dest-creds", f"{self.user}:{self.password}"]
        argv += [f"oci:{layout}:{tag}", f"docker://{ref}"]
        subprocess.run(argv, check=True, capture_output=True,
                       env={**os.environ, "HOME": str(self.root)})
        return ref

    def blob_data_path(self, digest: str) -> Path:
        hexpart = digest.partition(":")[2]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}{path}"

    def ping(self) -> int:
        try:
            with urllib.request.urlopen(self.url("/v2/"), timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)


class FlakyProxy:
    """TCP proxy to a registry whose first ``failures`` connections get HTTP 503."""

    def __init__(self, target_port: int, failures: int, cut_after: int | None = None) -> None:
        import threading

        self.target_port = target_port
        self.failures = failures
        self.cut_after = cut_after  # drop one connection once this many bytes went down
        self.downstream = 0
        self.cuts = 0
        self.seen = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stop = False
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import threading

        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.seen += 1
            if self.seen <= self.failures:
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                finally:
                    conn.close()
                continue
            up = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b, down in ((conn, up, False), (up, conn, True)):
                threading.Thread(target=self._pipe, args=(a, b, down), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, down: bool) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
                if down:
                    self.downstream += len(data)
                    if self.cut_after is not None and self.cuts == 0 \
                            and self.downstream > self.cut_after:
                        self.cuts += 1
                        break
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop = True
        self.sock.close()
