"""Bad input to rootfs: one line, typed, never late (API and ``python -m rootfs``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import rootfs
from rootfs._build import validate_config
from tests.rootfs._layers import E, layer
from tests.rootfs._registry import Registry

BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"Cmd": "notalist"}, "Cmd must be a list of strings, got 'notalist'"),
    ({"Cmd": ["/bin/sh", 5]}, "Cmd must be a list of strings"),
    ({"Entrypoint": "/bin/sh -c"}, "Entrypoint must be a list of strings"),
    ({"Env": "PATH=/bin"}, "Env must be a list of strings"),
    ({"Env": ["PATH"]}, "Env entry 'PATH' must be KEY=VALUE"),
    ({"Env": ["=x"]}, "Env entry '=x' must be KEY=VALUE"),
    ({"Env": [{"PATH": "/bin"}]}, "Env must be a list of strings"),
    ({"Cmd": ["a\x00b"]}, "Cmd must not contain NUL"),
    ({"WorkingDir": ["/app"]}, "WorkingDir must be a string"),
    ({"WorkingDir": "app"}, "WorkingDir must be an absolute path"),
    ({"User": 0}, "User must be a string"),
    ({"StopSignal": 15}, "StopSignal must be a string"),
    ({"Labels": ["a=b"]}, "Labels must map strings to strings"),
    ({"Labels": {"a": 1}}, "Labels must map strings to strings"),
    ({"ExposedPorts": ["80/tcp"]}, "ExposedPorts must map ports like '80/tcp' to {}"),
    ({"ExposedPorts": {"80/tcp": "yes"}}, "ExposedPorts must map ports"),
    ({"ExposedPorts": {"http": {}}}, "ExposedPorts key 'http' is not one of"),
    ({"ExposedPorts": {"70000/tcp": {}}}, "ExposedPorts key '70000/tcp'"),
    ({"ExposedPorts": {"80/icmp": {}}}, "ExposedPorts key '80/icmp'"),
    ({"Volumes": ["/data"]}, "Volumes must map absolute paths to {}"),
    ({"Volumes": {"data": {}}}, "Volumes key 'data' is not one of the absolute paths"),
    ({"Memory": 5}, "unknown image config key(s) ['Memory']"),
]


@pytest.mark.parametrize("config,needle", BAD_CONFIGS,
                         ids=[f"{i}-{next(iter(c))}" for i, (c, _) in enumerate(BAD_CONFIGS)])
def test_build_image_refuses_invalid_oci_config_first(
        config: dict[str, Any], needle: str, store: rootfs.ImageStore, tmp_path: Path) -> None:
    # the source does not even exist: the config is checked before any (slow) work
    with pytest.raises(rootfs.ImageFormatError) as ei:
        rootfs.build_image(tmp_path / "missing-src", "local/x:1", store, config=config)
    assert needle in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(rootfs.ImageFormatError, match="image config"):
        rootfs.image_from_layers(store, "local/x:1", [layer(E("f"))], config=config)
    assert store.list() == []


def test_valid_config_round_trips(store: rootfs.ImageStore) -> None:
    cfg = {"Cmd": ["/bin/sh"], "Entrypoint": ("/init",), "Env": ["A=1", "B=x=y", "C="],
           "WorkingDir": "/srv", "User": "1000:1000", "StopSignal": "SIGTERM",
           "Labels": {"team": "a"}, "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8080": {}},
           "Volumes": {"/data": {}}, "Memory": None}
    with pytest.raises(rootfs.ImageFormatError):  # Memory is unknown even when None
        validate_config(cfg)
    del cfg["Memory"]
    img = rootfs.image_from_layers(store, "local/ok:1", [layer(E("f"))], config=cfg)
    assert img.cmd == ["/bin/sh"] and img.entrypoint == ["/init"] and img.working_dir == "/srv"
    assert img.config["config"]["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}, "8080": {}}
    assert validate_config({"User": None, "Cmd": None}) == {}


def test_build_image_source_not_a_directory(store: rootfs.ImageStore, tmp_path: Path) -> None:
    with pytest.raises(rootfs.RootfsError, match="is not a directory"):
        rootfs.build_image(tmp_path / "nope", "local/x:1", store)


# -- one-line errors from the API and the CLI --------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rootfs", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def _one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: "), repr(proc.stderr)  # no stray blank line
    assert proc.stderr.count("\n") == 1, repr(proc.stderr)
    assert proc.stdout == "", repr(proc.stdout)
    assert needle in proc.stderr, proc.stderr


def test_microvm_home_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "home-file"
    f.write_text("not a dir")
    monkeypatch.setenv("MICROVM_HOME", str(f))
    with pytest.raises(rootfs.RootfsError, match=f"'{f}' is not a directory"):
        rootfs.ImageStore()
    _one_line_error(_cli("list", env={"MICROVM_HOME": str(f)}),
                    f"(from MICROVM_HOME='{f}'): '{f}' is not a directory")
    with pytest.raises(rootfs.RootfsError, match="is not a directory"):
        rootfs.ImageStore(f / "images")


def test_save_to_an_unwritable_place(store: rootfs.ImageStore, tmp_path: Path) -> None:
    rootfs.image_from_layers(store, "local/s:1", [layer(E("f"))])
    for dest in ("/proc/x.tar", "/proc/x-dir", str(tmp_path / "no/such/dir/x.tar")):
        with pytest.raises(rootfs.RootfsError, match="cannot save to"):
            store.save("local/s:1", dest)
        _one_line_error(_cli("--home", str(store.home), "save", "local/s:1", dest),
                        f"cannot save to '{dest}'")
    assert list((store.home / "tmp").iterdir()) == []


def test_pull_hints_speak_the_callers_language(registry: Registry, tmp_path: Path) -> None:
    src = rootfs.ImageStore(tmp_path / "src")
    img = rootfs.image_from_layers(src, "local/h:1", [layer(E("f"))])
    rootfs.write_oci_layout(src, tmp_path / "layout", {"h": img})
    ref = registry.push(tmp_path / "layout", "h", "hints/img")
    home = tmp_path / "home"
    # a plain-HTTP registry pulled over TLS: the API says insecure=True, the CLI --insecure
    with pytest.raises(rootfs.RegistryError, match=r"then pass insecure=True\)$"):
        rootfs.ImageStore(home).pull(ref)
    proc = _cli("--home", str(home), "pull", ref)
    _one_line_error(proc, "then pass --insecure)")
    assert "insecure=True" not in proc.stderr
    # a digest reference is shown as repo@sha256:..., never repo:sha256:...
    missing = f"{registry.host}/hints/img@sha256:{'a' * 64}"
    with pytest.raises(rootfs.ImageNotFoundError) as ei:
        rootfs.ImageStore(home).pull(missing, insecure=True)
    assert f"hints/img@sha256:{'a' * 64} not found" in str(ei.value)
    proc = _cli("--home", str(home), "pull", missing, "--insecure")
    _one_line_error(proc, f"{registry.host}/hints/img@sha256:{'a' * 64} not found")
    assert "img:sha256" not in proc.stderr
