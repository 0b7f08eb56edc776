"""Secrets, host patterns and HTTP/1 parsing as plain units (no sockets)."""

from __future__ import annotations

import base64
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tls_proxy import ConfigError, HostPattern, Secret, SecretError, SecretPolicy, parse_secret_spec
from tls_proxy._http1 import parse_head, request_framing, response_framing
from tls_proxy._secrets import Scanner, StreamScanner, Substituter
from tls_proxy.errors import HttpError


def test_secret_defaults_and_guest_env():
    s = Secret("OPENAI_API_KEY", "sk-123", "api.openai.com")
    assert s.placeholder == "$MSB_OPENAI_API_KEY"
    assert s.guest_env() == {"OPENAI_API_KEY": "$MSB_OPENAI_API_KEY"}
    assert s.inject == ("headers", "basic_auth")
    assert "sk-123" not in repr(s) and "sk-123" not in str(s)
    with pytest.raises(TypeError):
        pickle.dumps(s)


@pytest.mark.parametrize("kw,match", [
    (dict(env="1BAD"), "env name"),
    (dict(env="A=B"), "env name"),
    (dict(value=""), "non-empty"),
    (dict(value="a\r\nX: y"), "CR, LF"),
    (dict(hosts=[]), "at least one"),
    (dict(hosts=["a b"]), "invalid host pattern"),
    (dict(hosts=["a.*.com"]), "invalid host pattern"),
    (dict(placeholder=""), "placeholder"),
    (dict(placeholder="x" * 1025), "placeholder"),
    (dict(placeholder="a\nb"), "placeholder"),
    (dict(inject=("headers", "cookies")), "inject scopes"),
    (dict(value="contains-$MSB_K-inside"), "must not occur"),
])
def test_secret_validation_never_shows_value(kw, match):
    args = dict(env="K", value="topsecret-value", hosts=["a.example"]) | kw
    with pytest.raises(SecretError, match=match) as ei:
        Secret(**args)
    assert "topsecret" not in str(ei.value)
    if kw.get("value"):
        assert kw["value"] not in str(ei.value)


def test_host_patterns():
    assert HostPattern.parse("*").matches("anything.example")
    p = HostPattern.parse("*.Example.com")
    assert p.matches("example.com") and p.matches("A.B.example.com.")
    assert not p.matches("badexample.com")
    e = HostPattern.parse("api.example.com")
    assert e.matches("API.example.com:443") and not e.matches("x.api.example.com")
    with pytest.raises(ConfigError, match="invalid host pattern"):
        HostPattern.parse("")


def test_policy_split_and_duplicates():
    pol = SecretPolicy([Secret("A", "1", ["a.example"]), Secret("B", "2", ["*.b.example"])])
    el, inel = pol.split("x.b.example")
    assert [s.env for s in el] == ["B"] and [s.env for s in inel] == ["A"]
    assert pol.split(None)[0] == []
    with pytest.raises(SecretError, match="duplicate"):
        SecretPolicy([Secret("A", "1", ["a.example"]), Secret("A", "2", ["b.example"])])


def test_spec_parsing():
    s = parse_secret_spec("K=va@l@ue@a.example,*.b.example")
    assert s.value == "va@l@ue" and [str(h) for h in s.hosts] == ["a.example", "*.b.example"]
    with pytest.raises(SecretError, match="not set"):
        parse_secret_spec("NOPE_X=@a.example", {})


def test_scanner_forms():
    sc = Scanner([Secret("K", "v", ["a.example"])])
    assert sc.find(b"x $MSB_K y", "h").form == "plain"
    assert sc.find(b"x %24MSB_K y", "h").form == "percent-encoded"
    assert sc.find(b"%24%4d%53%42%5f%4b", "h").form == "percent-encoded"
    assert sc.find(b'"\\u0024MSB\\u005fK"', "h").form == "JSON-escaped"
    basic = b"Basic " + base64.b64encode(b"u:$MSB_K")
    assert sc.find_basic(basic).form == "base64 Basic auth"
    assert sc.find(b"$MSB_ K", "h") is None


@given(st.binary(max_size=300), st.binary(max_size=300), st.integers(1, 40))
def test_stream_scanner_finds_placeholder_across_any_split(a, b, cut):
    sc = Scanner([Secret("K", "v", ["a.example"])])
    data = a + b"%24MSB_K" + b
    cut = min(cut, len(data))
    ss = StreamScanner(sc, "body")
    hits = [ss.feed(data[i : i + cut]) for i in range(0, len(data), cut)]
    assert any(hits)


def test_substituter_scopes():
    s1 = Secret("K", "real", ["a.example"])
    s2 = Secret("KK", "other", ["a.example"], placeholder="$MSB_K_LONGER", inject=("body",))
    sub = Substituter([s1, s2])
    assert sub.header_value(b"$MSB_K $MSB_K_LONGER") == b"real $MSB_K_LONGER"
    assert sub.body_bytes(b"$MSB_K_LONGER $MSB_K") == b"other $MSB_K"
    auth = b"Basic " + base64.b64encode(b"me:$MSB_K")
    out = sub.header_value(auth, is_authorization=True)
    assert base64.b64decode(out.split()[1]) == b"me:real"
    assert sub.target(b"/$MSB_K?q=$MSB_K") == b"/$MSB_K?q=$MSB_K"  # no query scope


def test_head_parsing_and_framing():
    h = parse_head(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                   request=True)
    assert request_framing(h) == ("chunked", 0)
    r = parse_head(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", request=False)
    assert response_framing(r, b"GET") == ("none", 0)
    r = parse_head(b"HTTP/1.1 200 OK\r\n\r\n", request=False)
    assert response_framing(r, b"GET") == ("close", 0)
    assert response_framing(r, b"HEAD") == ("none", 0)
    with pytest.raises(HttpError) as ei:
        parse_head(b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", request=True)
    assert ei.value.status == 400
    with pytest.raises(HttpError):
        request_framing(parse_head(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                                   request=True))


@given(st.binary(max_size=500))
def test_head_parser_random_bytes(data):
    for req in (True, False):
        try:
            h = parse_head(data + b"\r\n\r\n", request=req)
            if req:
                request_framing(h)
        except HttpError as e:
            assert 400 <= e.status < 600
