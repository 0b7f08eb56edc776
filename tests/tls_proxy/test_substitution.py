"""Secrets through the explicit proxy: substituted per scope for their hosts, blocked elsewhere.

Real upstreams (trustme certificates, loopback), real clients: requests, httpx, curl.
"""

from __future__ import annotations

import base64
import json
import ssl

import httpx
import pytest
import requests

from tests.support import require_binaries
from tests.tls_proxy.helpers import curl, header, read_response, tls_tunnel

pytestmark = pytest.mark.timeout(60)


def _session(proxy, ca_cert) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"https": proxy.url}
    s.verify = ca_cert
    return s


def test_header_substitution_requests(proxy, upstream, ca_cert):
    s = _session(proxy, ca_cert)
    r = s.get(f"https://api.example.test:{upstream.port}/echo",
              headers={"Authorization": "Bearer $MSB_API_KEY", "X-Key": "k=$MSB_API_KEY;"})
    assert r.status_code == 200
    echo = r.json()
    assert header(echo, "Authorization") == ["Bearer real-api-key-123"]
    assert header(echo, "X-Key") == ["k=real-api-key-123;"]
    assert echo["sni"] == "api.example.test"


def test_header_substitution_httpx(proxy, upstream, ca_cert):
    ctx = ssl.create_default_context(cafile=ca_cert)
    with httpx.Client(proxy=proxy.url, verify=ctx, trust_env=False) as c:
        r = c.get(f"https://api.example.test:{upstream.port}/echo",
                  headers={"X-Api-Key": "$MSB_API_KEY"})
    assert r.status_code == 200
    assert header(r.json(), "X-Api-Key") == ["real-api-key-123"]


def test_header_substitution_curl_and_wildcard_host(proxy, upstream, ca_cert):
    require_binaries("curl")
    code, echo = curl(proxy.port, f"https://a.wild.example.test:{upstream.port}/e", ca_cert,
                      "-H", "Authorization: token $MSB_WILD")
    assert code == 200, echo
    assert header(echo, "Authorization") == ["token real-wild"]


def test_basic_auth_substitution_curl(proxy, upstream, ca_cert):
    require_binaries("curl")
    code, echo = curl(proxy.port, f"https://api.example.test:{upstream.port}/e", ca_cert,
                      "-u", "user:$MSB_API_KEY")
    assert code == 200, echo
    (auth,) = header(echo, "Authorization")
    assert base64.b64decode(auth.split()[1]) == b"user:real-api-key-123"


def test_query_scope_is_opt_in(proxy, upstream, ca_cert):
    s = _session(proxy, ca_cert)
    # QTOKEN opted into query: replaced in the query, never in the path
    r = s.get(f"https://q.example.test:{upstream.port}/p/$MSB_QTOKEN?t=$MSB_QTOKEN&x=1")
    assert r.json()["target"] == "/p/$MSB_QTOKEN?t=real-q-token&x=1"
    # API_KEY did not: its placeholder reaches its own host unchanged
    r = s.get(f"https://api.example.test:{upstream.port}/e?k=$MSB_API_KEY")
    assert r.json()["target"] == "/e?k=$MSB_API_KEY"


def test_body_substitution_content_length_rewritten(proxy, upstream, ca_cert):
    s = _session(proxy, ca_cert)
    body = json.dumps({"token": "$MSB_QTOKEN", "n": 1}).encode()
    r = s.post(f"https://q.example.test:{upstream.port}/e", data=body,
               headers={"Content-Type": "application/json"})
    echo = r.json()
    assert json.loads(echo["body"])["token"] == "real-q-token"
    assert header(echo, "Content-Length") == [str(echo["body_len"])]
    assert echo["body_len"] == len(body) - len("$MSB_QTOKEN") + len("real-q-token")


def test_body_substitution_chunked_rechunked(proxy, upstream, ca_cert):
    s = _session(proxy, ca_cert)

    def gen():
        yield b"a=$MSB_QT"
        yield b"OKEN&b=2"

    r = s.post(f"https://q.example.test:{upstream.port}/e", data=gen())
    echo = r.json()
    assert header(echo, "Transfer-Encoding") == ["chunked"]
    assert echo["body"] == "a=real-q-token&b=2"


def test_no_body_substitution_by_default(proxy, upstream, ca_cert):
    s = _session(proxy, ca_cert)
    r = s.post(f"https://api.example.test:{upstream.port}/e", data=b"k=$MSB_API_KEY")
    assert r.json()["body"] == "k=$MSB_API_KEY"


LEAKS = {
    "header": dict(headers={"Authorization": "Bearer $MSB_API_KEY"}),
    "percent-query": dict(params={"k": "$MSB_API_KEY"}),  # requests encodes $ as %24
    "fully-percent": dict(headers={"X-A": "%24%4D%53%42%5F%41%50%49%5F%4B%45%59"}),
    "json-body": dict(data=b'{"k": "\\u0024MSB_API_KEY"}'),
    "basic": dict(auth=("me", "$MSB_API_KEY")),
    "form-body": dict(data={"k": "$MSB_API_KEY"}),
    "path": dict(path="/x/$MSB_API_KEY"),
}


@pytest.mark.parametrize("how", sorted(LEAKS))
def test_placeholder_to_other_host_blocked(proxy, upstream, ca_cert, how):
    s = _session(proxy, ca_cert)
    kw = dict(LEAKS[how])
    path = kw.pop("path", "/e")
    before = proxy.proxy.stats.blocked
    r = s.post(f"https://other.example.test:{upstream.port}{path}", **kw)
    assert r.status_code == 403
    assert r.headers["Content-Type"] == "application/json"
    j = r.json()
    assert j["error"] == "secret_policy_denied"
    assert "API_KEY" in j["reason"]
    assert "real-api-key" not in r.text
    assert proxy.proxy.stats.blocked == before + 1
    assert all("real-api-key" not in e for e in proxy.proxy.stats.events)


def test_placeholder_split_across_chunks_blocked(proxy, upstream, ca_cert):
    s = _session(proxy, ca_cert)

    def gen():
        yield b"x" * 70000 + b"$MSB_A"
        yield b"PI_KEY" + b"y" * 10

    r = s.post(f"https://other.example.test:{upstream.port}/e", data=gen())
    assert r.status_code == 403
    assert r.json()["error"] == "secret_policy_denied"


def test_host_sni_mismatch_blocked(proxy, upstream, ca_cert):
    require_binaries("curl")
    code, body = curl(proxy.port, f"https://api.example.test:{upstream.port}/e", ca_cert,
                      "-H", "Host: other.example.test", "-H", "X: $MSB_API_KEY")
    assert code == 403
    assert body["error"] == "authority_mismatch"


def test_log_never_contains_values(proxy, upstream, ca_cert, caplog):
    s = _session(proxy, ca_cert)
    with caplog.at_level("DEBUG", logger="tls_proxy"):
        s.get(f"https://other.example.test:{upstream.port}/e",
              headers={"A": "$MSB_QTOKEN"})
        s.get(f"https://api.example.test:{upstream.port}/e", headers={"A": "$MSB_API_KEY"})
    text = caplog.text
    assert "secret QTOKEN" in text or "env=QTOKEN" in text
    for v in ("real-api-key-123", "real-q-token", "real-wild"):
        assert v not in text


def test_pipelined_requests_then_block_in_order(proxy, upstream, ca_cert):
    s = tls_tunnel(proxy.port, "api.example.test", upstream.port, ca_cert)
    try:
        reqs = b"".join(
            b"GET /e%d HTTP/1.1\r\nHost: api.example.test\r\nX: $MSB_API_KEY\r\n\r\n" % i
            for i in range(3)
        ) + b"GET /leak HTTP/1.1\r\nHost: api.example.test\r\nX: $MSB_QTOKEN\r\n\r\n"
        s.sendall(reqs)
        buf = bytearray()
        for i in range(3):
            st, _, body = read_response(s, buf)
            echo = json.loads(body)
            assert st == 200 and echo["target"] == f"/e{i}"
            assert header(echo, "X") == ["real-api-key-123"]
        st, hdrs, body = read_response(s, buf)
        assert st == 403 and json.loads(body)["error"] == "secret_policy_denied"
        assert hdrs["connection"] == "close"
    finally:
        s.close()


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_placeholder_inside_compressed_body_blocked(proxy, upstream, ca_cert, coding):
    import gzip
    import zlib

    data = b'{"k": "$MSB_API_KEY"}' + b" " * 100000
    comp = gzip.compress(data) if coding == "gzip" else zlib.compress(data)
    s = _session(proxy, ca_cert)
    r = s.post(f"https://other.example.test:{upstream.port}/e", data=comp,
               headers={"Content-Encoding": coding})
    assert r.status_code == 403 and "decompressed body" in r.json()["reason"]
    # a clean compressed body passes unchanged
    clean = gzip.compress(b"nothing to see")
    r = s.post(f"https://other.example.test:{upstream.port}/e", data=clean,
               headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["body_len"] == len(clean)


def test_uninspectable_encoding_refused_when_secrets_could_leak(proxy, upstream, ca_cert):
    s = _session(proxy, ca_cert)
    r = s.post(f"https://other.example.test:{upstream.port}/e", data=b"\x00\x01",
               headers={"Content-Encoding": "br"})
    assert r.status_code == 415
    r = s.post(f"https://other.example.test:{upstream.port}/e", data=b"not gzip at all",
               headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400
