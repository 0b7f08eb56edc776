"""Sandbox.create refuses bad arguments with one-line SandboxConfigError before any work.

No guest boots here: the image is a reference to a registry that does not exist, so a
validation that came after the pull would surface as a pull error instead, and every
test checks that nothing was left behind (no record, no sandbox directory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microvm import Sandbox
from microvm.errors import SandboxConfigError, SandboxNotFound
from microvm.sandbox import Volume

UNPULLABLE = "registry.invalid/none/such:1"


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, empty ``MICROVM_HOME``."""
    h = tmp_path / "home"
    monkeypatch.setenv("MICROVM_HOME", str(h))
    yield h


def _refused(home: Path, match: str, **kw: Any) -> SandboxConfigError:
    with pytest.raises(SandboxConfigError, match=match) as ei:
        Sandbox.create("cfg-test", image=kw.pop("image", UNPULLABLE), network="none", **kw)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    with pytest.raises(SandboxNotFound):
        Sandbox.get("cfg-test")
    assert not (home / "sandboxes" / "cfg-test").exists()
    assert list((home / "images").glob("blobs/*/*")) == []     # nothing was pulled
    return ei.value


@pytest.mark.parametrize("guest", ["/", "/proc", "/proc/sys", "/sys", "/dev", "/dev/shm",
                                   "/usr", "/usr/", "//usr", "/etc", "/bin", "/sbin", "/lib",
                                   "/var", "/run", "/.microvm", "/.microvm/x", "/usr/bin"])
def test_volume_shadowing_the_system_is_refused(home: Path, tmp_path: Path, guest: str) -> None:
    e = _refused(home, "would shadow the system", volumes={guest: str(tmp_path)})
    assert repr(guest) in str(e)


@pytest.mark.parametrize("guest", ["/data", "/mnt/x", "/home/u/work", "/usr/src/app", "/opt"])
def test_volume_below_a_path_of_its_own_is_accepted(tmp_path: Path, guest: str) -> None:
    v = Volume.parse(guest, str(tmp_path))
    assert v.guest_path == guest.rstrip("/") and v.host == str(tmp_path.resolve())


@pytest.mark.parametrize(("volumes", "match"), [
    ({"data": "/tmp"}, "must be absolute"),
    ({"/data/../etc": "/tmp"}, r"'\.' and '\.\.' are not allowed"),
    ({"/data": "/no/such/dir/for/sure"}, "does not exist"),
    ({"/data": {"host": "/tmp", "named": "x"}}, "exactly one of 'host' or 'named'"),
    ({"/data": {}}, "exactly one of 'host' or 'named'"),
    ({"/data": {"host": "/tmp", "readonly": "yes"}}, "readonly must be a bool"),
    ({"/data": {"host": "/tmp", "rw": True}}, r"unknown keys \['rw'\]"),
    ({"/data": {"named": "../escape"}}, "bad volume name"),
    ({"/data": 42}, "give a host directory"),
])
def test_bad_volume_specs(home: Path, volumes: dict[str, Any], match: str) -> None:
    _refused(home, match, volumes=volumes)


@pytest.mark.parametrize(("kw", "match"), [
    ({"max_duration": 0}, "bad max_duration"),
    ({"max_duration": "soon"}, "bad max_duration"),
    ({"idle_timeout": -1}, "bad idle_timeout"),
    ({"idle_timeout": True}, "bad idle_timeout"),
    ({"replace_with_timeout": -1}, "bad replace_with_timeout"),
    ({"boot_timeout": 0}, "bad boot_timeout"),
    ({"patches": ["/etc/motd"]}, "patches must be rootfs.Patch"),
    ({"ports": ["80"]}, "bad port mapping"),
    ({"ports": {70000: 80}}, "bad host port"),
    ({"secrets": [{"env": "T", "value": "v"}]}, "exactly one of 'host' or 'hosts'"),
    ({"registry_auth": {"username": "u"}}, "registry_auth needs"),
])
def test_bad_arguments(home: Path, kw: dict[str, Any], match: str) -> None:
    _refused(home, match, **kw)


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 64, "é"])
def test_bad_names(home: Path, name: str) -> None:
    with pytest.raises(SandboxConfigError, match="bad sandbox name"):
        Sandbox.create(name, image=UNPULLABLE, network="none")
    assert not (home / "sandboxes").exists() or not os.listdir(home / "sandboxes")


def test_bad_image_type(home: Path) -> None:
    with pytest.raises(SandboxConfigError, match="image must be"):
        Sandbox.create("cfg-test", image=42, network="none")  # type: ignore[arg-type]


def test_missing_sandbox(home: Path) -> None:
    with pytest.raises(SandboxNotFound, match="'missing'"):
        Sandbox.get("missing")
    with pytest.raises(SandboxNotFound, match="'missing'"):
        Sandbox.remove("missing")
    assert Sandbox.list() == [] and Sandbox.list(labels={"a": "b"}) == []
