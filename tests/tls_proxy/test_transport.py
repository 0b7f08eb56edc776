"""Proxy transport behaviour: bypass splicing, upstream verification, keep-alive, large
streamed bodies, upgrades, 100 parallel clients, and the openssl client."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support import require_binaries
from tests.tls_proxy.helpers import connect_tunnel, curl, read_response, tls_tunnel

pytestmark = pytest.mark.timeout(60)


def _session(proxy, verify) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"https": proxy.url}
    s.verify = verify
    return s


def test_bypass_host_is_spliced_with_upstream_certificate(proxy, upstream, upstream_ca_pem):
    raw = connect_tunnel(proxy.port, "bypass.example.test", upstream.port)
    ctx = ssl.create_default_context(cafile=upstream_ca_pem)  # upstream's CA, not ours
    before = proxy.proxy.bypassed
    with ctx.wrap_socket(raw, server_hostname="bypass.example.test") as s:
        cert = s.getpeercert()
        issuer = dict(x[0] for x in cert["issuer"])
        assert "microvm-sandbox" not in json.dumps(issuer)
        s.sendall(b"GET /e HTTP/1.1\r\nHost: bypass.example.test\r\nX: $MSB_API_KEY\r\n\r\n")
        st, _, body = read_response(s, bytearray())
    assert st == 200
    # no inspection on bypassed flows: the placeholder passes as is (documented)
    assert ["X", "$MSB_API_KEY"] in json.loads(body)["headers"]
    assert proxy.proxy.bypassed == before + 1


def test_bypass_with_openssl_s_client(proxy, upstream, upstream_ca_pem):
    require_binaries("openssl")
    out = subprocess.run(
        ["openssl", "s_client", "-proxy", f"127.0.0.1:{proxy.port}",
         "-connect", f"bypass.example.test:{upstream.port}", "-servername",
         "bypass.example.test", "-CAfile", upstream_ca_pem, "-verify_return_error", "-brief"],
        input=b"", capture_output=True, timeout=30,
    )
    text = out.stdout.decode() + out.stderr.decode()
    assert "Verification: OK" in text, text


def test_intercepted_with_openssl_s_client(proxy, upstream, ca_cert):
    require_binaries("openssl")
    req = b"GET /e HTTP/1.1\r\nHost: api.example.test\r\nX: $MSB_API_KEY\r\nConnection: close\r\n\r\n"
    out = subprocess.run(
        ["openssl", "s_client", "-proxy", f"127.0.0.1:{proxy.port}", "-quiet",
         "-connect", f"api.example.test:{upstream.port}", "-servername", "api.example.test",
         "-CAfile", ca_cert, "-verify_return_error", "-alpn", "h2,http/1.1"],
        input=req, capture_output=True, timeout=30,
    )
    assert b"200 OK" in out.stdout, out.stderr
    assert b"real-api-key-123" in out.stdout


def test_untrusted_upstream_refused_with_clear_error(proxy, rogue_upstream, ca_cert):
    s = _session(proxy, ca_cert)
    r = s.get(f"https://untrusted.example.test:{rogue_upstream.port}/e",
              headers={"X": "$MSB_API_KEY"})
    assert r.status_code == 502
    j = r.json()
    assert j["error"] == "upstream_error"
    assert "certificate rejected" in j["reason"] and "untrusted.example.test" in j["reason"]


def test_unreachable_upstream_is_502(proxy, ca_cert):
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        dead = sk.getsockname()[1]
    r = _session(proxy, ca_cert).get(f"https://api.example.test:{dead}/e")
    assert r.status_code == 502 and "unreachable" in r.json()["reason"]


def test_keep_alive_reuses_one_connection(proxy, upstream, ca_cert):
    s = _session(proxy, ca_cert)
    before = proxy.proxy.connections
    for i in range(20):
        r = s.get(f"https://api.example.test:{upstream.port}/k{i}", headers={"X": "$MSB_API_KEY"})
        assert r.status_code == 200 and r.json()["target"] == f"/k{i}"
    assert proxy.proxy.connections == before + 1


def test_large_streamed_upload_and_download(proxy, upstream, ca_cert):
    s = _session(proxy, ca_cert)
    block = os.urandom(1 << 20)
    h = hashlib.sha256()

    def gen():
        for _ in range(24):
            h.update(block)
            yield block

    r = s.post(f"https://api.example.test:{upstream.port}/up", data=gen())
    assert r.status_code == 200
    assert r.json()["body_len"] == 24 << 20 and r.json()["sha256"] == h.hexdigest()
    r = s.get(f"https://api.example.test:{upstream.port}/bytes/{40 << 20}", stream=True)
    n = sum(len(c) for c in r.iter_content(1 << 16))
    assert n == 40 << 20
    r = s.get(f"https://api.example.test:{upstream.port}/chunked/{5 << 20}")
    assert len(r.content) == 5 << 20


def test_body_substitution_size_cap(proxy_ca_dir, upstream_ca_pem, upstream, ca_cert):
    from tests.tls_proxy.conftest import ProxyThread, make_config

    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem, max_body_buffer=1000))
    try:
        r = _session(pt, ca_cert).post(f"https://q.example.test:{upstream.port}/e",
                                       data=b"z" * 5000)
        assert r.status_code == 413
    finally:
        pt.stop()


def test_upgrade_then_raw_echo(proxy, upstream, ca_cert):
    s = tls_tunnel(proxy.port, "api.example.test", upstream.port, ca_cert)
    try:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: api.example.test\r\nConnection: Upgrade\r\n"
                  b"Upgrade: echo\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        assert buf.startswith(b"HTTP/1.1 101")
        s.sendall(b"hello raw")
        got = buf.split(b"\r\n\r\n", 1)[1]
        while len(got) < 9:
            got += s.recv(4096)
        assert got == b"hello raw"
    finally:
        s.close()


def test_hundred_parallel_clients(proxy, upstream, ca_cert):
    def one(i: int) -> tuple[int, str]:
        s = _session(proxy, ca_cert)
        r = s.get(f"https://api.example.test:{upstream.port}/c{i}",
                  headers={"Authorization": "Bearer $MSB_API_KEY"})
        s.close()
        auth = [v for k, v in r.json()["headers"] if k == "Authorization"]
        return r.status_code, auth[0]

    with ThreadPoolExecutor(100) as ex:
        results = list(ex.map(one, range(100)))
    assert results == [(200, "Bearer real-api-key-123")] * 100


def test_alpn_h2_offer_falls_back_to_http11(proxy, upstream, ca_cert):
    raw = connect_tunnel(proxy.port, "api.example.test", upstream.port)
    ctx = ssl.create_default_context(cafile=ca_cert)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with ctx.wrap_socket(raw, server_hostname="api.example.test") as s:
        assert s.selected_alpn_protocol() == "http/1.1"


def test_leaf_presented_by_proxy(proxy, upstream, ca_cert):
    require_binaries("curl")
    code, _ = curl(proxy.port, f"https://api.example.test:{upstream.port}/e", ca_cert)
    assert code == 200
    s = tls_tunnel(proxy.port, "api.example.test", upstream.port, ca_cert)
    cert = s.getpeercert()
    s.close()
    assert ("DNS", "api.example.test") in cert["subjectAltName"]


@pytest.mark.parametrize("host", ["api.example.test", "q.example.test"])
def test_expect_100_continue_upload_with_curl(proxy, upstream, ca_cert, tmp_path, host):
    require_binaries("curl")
    import time

    f = tmp_path / "body"
    prefix = b"k=$MSB_QTOKEN&" if host == "q.example.test" else b"k=v&"
    f.write_bytes(prefix + b"z" * (2 << 20))
    t0 = time.monotonic()
    code, echo = curl(proxy.port, f"https://{host}:{upstream.port}/up", ca_cert,
                      "--data-binary", f"@{f}", "-H", "Expect: 100-continue",
                      "--expect100-timeout", "15")
    assert code == 200, echo
    assert time.monotonic() - t0 < 10  # the 100 came through; curl did not wait 15 s
    if host == "q.example.test":  # body scope: buffered, substituted, 100 sent by the proxy
        assert echo["body"].startswith("k=real-q-token&")
        assert echo["body_len"] == (2 << 20) + len("k=real-q-token&")
    else:
        assert echo["body_len"] == (2 << 20) + len("k=v&")


def test_per_host_upstream_overrides(proxy_ca_dir, upstream_ca_pem, rogue_upstream, ca_cert,
                                     tmp_path):
    from tests.tls_proxy.conftest import ProxyThread, make_config

    url = f"https://untrusted.example.test:{rogue_upstream.port}/e"
    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem,
                                 no_verify=["*.example.test"]))
    try:
        assert _session(pt, ca_cert).get(url).status_code == 200
    finally:
        pt.stop()
    # a scoped CA for another pattern does not help this host
    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem,
                                 scoped_upstream_ca={"api.example.test": upstream_ca_pem}))
    try:
        assert _session(pt, ca_cert).get(url).status_code == 502
    finally:
        pt.stop()


def test_scoped_upstream_ca_trusts_only_its_hosts(proxy_ca_dir, upstream_ca_pem, upstream,
                                                  ca_cert, tmp_path):
    from tests.tls_proxy.conftest import ProxyThread, make_config

    # the upstream CA is trusted only for *.example.test; not globally
    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem, upstream_ca_files=[],
                                 scoped_upstream_ca={"*.example.test": upstream_ca_pem}))
    try:
        r = _session(pt, ca_cert).get(f"https://api.example.test:{upstream.port}/e")
        assert r.status_code == 200
    finally:
        pt.stop()
    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem, upstream_ca_files=[]))
    try:
        r = _session(pt, ca_cert).get(f"https://api.example.test:{upstream.port}/e")
        assert r.status_code == 502 and "certificate rejected" in r.json()["reason"]
    finally:
        pt.stop()


def test_upstream_close_closes_client_promptly(proxy_ca_dir, upstream_ca_pem, upstream,
                                               ca_cert):
    import time

    from tests.tls_proxy.conftest import ProxyThread, make_config

    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem, header_timeout=30.0))
    try:
        s = tls_tunnel(pt.port, "api.example.test", upstream.port, ca_cert)
        s.sendall(b"GET /close HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
        st, hdrs, _ = read_response(s, bytearray())
        assert st == 200 and hdrs["connection"] == "close"
        t0 = time.monotonic()
        s.settimeout(10)
        assert s.recv(10) == b""
        assert time.monotonic() - t0 < 3
        s.close()
    finally:
        pt.stop()
