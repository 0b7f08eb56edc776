"""HTTP/2 end to end: h2 clients (curl, httpx) through the proxy to an h2 upstream."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import Iterator

import httpx
import pytest
import trustme

from benchmarks._tls_proxy_upstream import UpstreamThread
from tests.support import require_binaries
from tests.tls_proxy.conftest import NAMES

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def h2_upstream(upstream_ca: trustme.CA) -> Iterator[UpstreamThread]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    upstream_ca.issue_cert(*NAMES).configure_cert(ctx)
    u = UpstreamThread(ctx, h2=True).start()
    yield u
    u.stop()


def _hdr(echo, name):
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


def _curl_h2(proxy, url, ca_cert, *args):
    out = subprocess.run(
        ["curl", "-sS", "--http2", "--max-time", "20", "--proxy", proxy.url, "--cacert",
         ca_cert, "-w", "\n%{http_version} %{http_code}", *args, url],
        capture_output=True, text=True, timeout=30)
    body, _, tail = out.stdout.rpartition("\n")
    version, _, code = tail.partition(" ")
    return version, int(code or 0), body, out.stderr


def test_curl_h2_substitution(proxy, h2_upstream, ca_cert):
    require_binaries("curl")
    version, code, body, err = _curl_h2(
        proxy, f"https://api.example.test:{h2_upstream.port}/e?q=1", ca_cert,
        "-H", "Authorization: Bearer $MSB_API_KEY")
    assert (version, code) == ("2", 200), err
    echo = json.loads(body)
    assert echo["alpn"] == "h2"
    assert _hdr(echo, "authorization") == ["Bearer real-api-key-123"]


def test_curl_h2_leak_blocked_and_authority_checked(proxy, h2_upstream, ca_cert):
    require_binaries("curl")
    _, code, body, _ = _curl_h2(proxy, f"https://other.example.test:{h2_upstream.port}/e",
                                ca_cert, "-H", "X: %24MSB_API_KEY")
    assert code == 403 and json.loads(body)["error"] == "secret_policy_denied"
    _, code, body, _ = _curl_h2(proxy, f"https://api.example.test:{h2_upstream.port}/e",
                                ca_cert, "-H", "Host: other.example.test")
    assert code == 403 and json.loads(body)["error"] == "authority_mismatch"


def test_h2_body_leak_blocked_and_clean_body_streams(proxy, h2_upstream, ca_cert, tmp_path):
    require_binaries("curl")
    _, code, body, _ = _curl_h2(proxy, f"https://other.example.test:{h2_upstream.port}/e",
                                ca_cert, "--data-binary", '{"k":"\\u0024MSB_API_KEY"}')
    assert code == 403 and "API_KEY" in json.loads(body)["reason"]
    (tmp_path / "big").write_bytes(b"z" * (3 << 20))
    _, code, body, err = _curl_h2(proxy, f"https://other.example.test:{h2_upstream.port}/e",
                                  ca_cert, "--data-binary", f"@{tmp_path / 'big'}")
    assert code == 200, err
    assert json.loads(body)["body_len"] == 3 << 20


def test_httpx_h2_many_streams_one_connection(proxy, h2_upstream, ca_cert):
    pytest.importorskip("h2")
    ctx = ssl.create_default_context(cafile=ca_cert)
    before = proxy.proxy.connections

    async def main():
        async with httpx.AsyncClient(http2=True, proxy=proxy.url, verify=ctx,
                                     trust_env=False) as c:
            await c.get(f"https://api.example.test:{h2_upstream.port}/warm")
            rs = await asyncio.gather(*[
                c.get(f"https://api.example.test:{h2_upstream.port}/s{i}",
                      headers={"X-Key": "$MSB_API_KEY"}) for i in range(30)])
            big = await c.get(f"https://api.example.test:{h2_upstream.port}/bytes/{8 << 20}")
            return rs, big

    rs, big = asyncio.run(main())
    assert all(r.http_version == "HTTP/2" and r.status_code == 200 for r in rs)
    assert all(_hdr(r.json(), "x-key") == ["real-api-key-123"] for r in rs)
    assert len(big.content) == 8 << 20
    assert proxy.proxy.connections == before + 1


def test_h2_refused_when_disabled(proxy_ca_dir, upstream_ca_pem, h2_upstream, ca_cert):
    require_binaries("curl")
    from tests.tls_proxy.conftest import ProxyThread, make_config

    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem, http2=False))
    try:
        version, code, body, _ = _curl_h2(
            pt, f"https://api.example.test:{h2_upstream.port}/e", ca_cert,
            "-H", "A: $MSB_API_KEY")
        assert (version, code) == ("1.1", 200)
        assert _hdr(json.loads(body), "A") == ["real-api-key-123"]
    finally:
        pt.stop()


def test_h2_compressed_body_leak_blocked(proxy, h2_upstream, ca_cert, tmp_path):
    require_binaries("curl")
    import gzip

    (tmp_path / "gz").write_bytes(gzip.compress(b"token=$MSB_API_KEY" + b" " * 50000))
    _, code, body, _ = _curl_h2(proxy, f"https://other.example.test:{h2_upstream.port}/e",
                                ca_cert, "-H", "Content-Encoding: gzip",
                                "--data-binary", f"@{tmp_path / 'gz'}")
    assert code == 403 and "decompressed" in json.loads(body)["reason"]
    _, code, body, _ = _curl_h2(proxy, f"https://other.example.test:{h2_upstream.port}/e",
                                ca_cert, "-H", "Content-Encoding: br", "--data-binary", "x")
    assert code == 415
