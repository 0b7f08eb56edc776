"""Fixtures: trustme-signed HTTPS upstreams on loopback and a tls_proxy in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from benchmarks._tls_proxy_upstream import UpstreamThread
from tls_proxy import CertificateAuthority, ProxyConfig, Secret, TlsProxy

NAMES = ["api.example.test", "other.example.test", "bypass.example.test",
         "q.example.test", "*.wild.example.test"]
SECRETS = [
    Secret("API_KEY", "real-api-key-123", ["api.example.test"]),
    Secret("QTOKEN", "real-q-token", ["q.example.test"], inject=("headers", "basic_auth", "query",
                                                                  "body")),
    Secret("WILD", "real-wild", ["*.wild.example.test"]),
]


class ProxyThread:
    """A TlsProxy (explicit mode) running in its own event loop thread."""

    def __init__(self, config: ProxyConfig) -> None:
        self.proxy = TlsProxy(config)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            _, self.port = self.loop.run_until_complete(
                self.proxy.listen_explicit("127.0.0.1", 0))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def shutdown() -> None:
            await self.proxy.close()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            if rest:
                await asyncio.wait(rest, timeout=2)

        fut = asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        try:
            fut.result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@pytest.fixture(scope="session")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def upstream_ca_pem(upstream_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("upca") / "ca.pem"
    upstream_ca.cert_pem.write_to_path(str(p))
    return str(p)


@pytest.fixture(scope="session")
def upstream(upstream_ca: trustme.CA) -> Iterator[UpstreamThread]:
    ctx = __import__("ssl").SSLContext(__import__("ssl").PROTOCOL_TLS_SERVER)
    upstream_ca.issue_cert(*NAMES).configure_cert(ctx)
    u = UpstreamThread(ctx).start()
    yield u
    u.stop()


@pytest.fixture(scope="session")
def rogue_upstream() -> Iterator[UpstreamThread]:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("untrusted.example.test").configure_cert(ctx)
    u = UpstreamThread(ctx).start()
    yield u
    u.stop()


@pytest.fixture(scope="session")
def proxy_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proxyca")


def make_config(ca_dir: Path, upstream_ca_pem: str, **kw: Any) -> ProxyConfig:
    ca = CertificateAuthority.load_or_create(ca_dir)
    base: dict[str, Any] = dict(
        ca=ca, secrets=SECRETS, bypass=["bypass.example.test"],
        upstream_ca_files=[upstream_ca_pem],
        resolve={n.replace("*", "x"): "127.0.0.1" for n in NAMES}
        | {"untrusted.example.test": "127.0.0.1", "a.wild.example.test": "127.0.0.1"},
        header_timeout=2.0, handshake_timeout=2.0,
    )
    base.update(kw)
    return ProxyConfig(**base)


@pytest.fixture(scope="module")
def proxy(proxy_ca_dir: Path, upstream_ca_pem: str) -> Iterator[ProxyThread]:
    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem))
    yield pt
    pt.stop()


@pytest.fixture(scope="session")
def ca_cert(proxy_ca_dir: Path) -> str:
    return str(CertificateAuthority.load_or_create(proxy_ca_dir).cert_path)
