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


@dataclass
class Registry:
    root: Path
    tls: bool = False
    user: str | None = None
    password: str | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    ca_pem: Path | None = None
    cert_dir: Path | None = None
    log: Path | None = None
    _ca: object = field(default=None, repr=False)

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
        if self.user is not None:
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
