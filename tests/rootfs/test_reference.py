"""Docker-style reference parsing: defaults, ports, digests; errors name the bad part."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import rootfs
from rootfs import parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "registry", "repo", "tag", "digest"), [
    ("alpine", "docker.io", "library/alpine", "latest", None),
    ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
    ("user/app", "docker.io", "user/app", "latest", None),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
    ("index.docker.io/library/alpine:1", "docker.io", "library/alpine", "1", None),
    ("ghcr.io/org/sub/tool:v1.2", "ghcr.io", "org/sub/tool", "v1.2", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/app", "localhost:5000", "app", "latest", None),
    ("127.0.0.1:5000/team/app:dev", "127.0.0.1:5000", "team/app", "dev", None),
    ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
    (f"alpine@{D}", "docker.io", "library/alpine", None, D),
    (f"reg.test:443/a/b:t@{D}", "reg.test:443", "a/b", "t", D),
    ("a__b/c-d.e_f:T_1.x-", "docker.io", "a__b/c-d.e_f", "T_1.x-", None),
])
def test_valid(text: str, registry: str, repo: str, tag: str | None, digest: str | None) -> None:
    r = parse_reference(text)
    assert (r.registry, r.repository, r.tag, r.digest) == (registry, repo, tag, digest)
    assert parse_reference(str(r)) == r


def test_api_host_and_selector() -> None:
    assert parse_reference("alpine").api_host == "registry-1.docker.io"
    assert parse_reference("reg.test:5000/a").api_host == "reg.test:5000"
    assert parse_reference(f"a:1@{D}").selector == D
    assert parse_reference("a:1").selector == "1"


@pytest.mark.parametrize(("text", "part"), [
    ("Alpine", "bad repository component 'Alpine'"),
    ("a//b", "bad repository component ''"),
    ("a/-b", "bad repository component '-b'"),
    ("a:", "bad tag ''"),
    ("a:.x", "bad tag '.x'"),
    ("a:" + "x" * 129, "bad tag"),
    ("reg.test:0/a", "bad registry port '0'"),
    ("reg.test:99999/a", "bad registry port '99999'"),
    ("reg_bad.test/a", "bad registry host 'reg_bad.test'"),
    ("a@sha256:123", "bad digest"),
    ("a@md5:" + "0" * 32, "bad digest"),
    ("", "empty"),
    (" alpine", "surrounding spaces"),
    ("a/" + "b" * 260, "longer than 255"),
])
def test_invalid_names_the_part(text: str, part: str) -> None:
    with pytest.raises(rootfs.InvalidReferenceError, match=part.replace("(", r"\(")):
        parse_reference(text)


def test_non_string_is_refused() -> None:
    with pytest.raises(rootfs.InvalidReferenceError, match="must be a string"):
        parse_reference(5)  # type: ignore[arg-type]


@given(st.text(max_size=80))
def test_never_crashes(text: str) -> None:
    try:
        r = parse_reference(text)
    except rootfs.InvalidReferenceError:
        return
    assert parse_reference(str(r)) == r


comp = st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+)?", fullmatch=True).filter(lambda s: len(s) < 20)


@given(st.lists(comp, min_size=1, max_size=3), st.one_of(st.none(), st.from_regex(
    r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True)))
def test_round_trip(parts: list[str], tag: str | None) -> None:
    text = "reg.test:5000/" + "/".join(parts) + (f":{tag}" if tag else "")
    r = parse_reference(text)
    assert r.repository == "/".join(parts) and r.tag == (tag or "latest")
    assert str(r) == (text if tag else text + ":latest")
