"""The shared supervisor zygote of the ``microvm`` command (:mod:`microvm.sandbox._zygote`).

* Two real ``microvm run --rm`` in a row: the first starts the shared zygote, which
  outlives it; the second is forked by that same zygote (its pid file says so: same pid,
  two forks served), not by a new one.
* Another uid is refused: with the runtime directory and the socket opened up to everyone
  (as a misconfiguration would), a client running as ``nobody`` (``setpriv``) gets its
  connection closed (``SO_PEERCRED`` check) where ours gets "ready".
* :func:`~microvm.sandbox._zygote.runtime_dir` refuses a directory that is not ours or is
  open to others; ``MICROVM_ZYGOTE=0`` starts none.

Each test uses its own runtime directory (``$MICROVM_ZYGOTE_DIR``) and stops its zygotes
at the end (:func:`~microvm.sandbox._zygote.stop_shared`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rootfs
from microvm.sandbox import _zygote as zygote
from microvm.sandbox._state import process_alive
from tests.microvm.sandbox_fixtures import (  # noqa: F401
    busybox_image,
    microvm_cli,
    sandbox_home_fixture,
)
from tests.support import require_binaries

IMG = "local/busybox:1"


@pytest.fixture
def zdir() -> Iterator[Path]:
    """A private runtime directory for this test's shared zygotes (short: a socket path
    is limited to 108 bytes); its zygotes are stopped and it is removed at the end."""
    d = Path(tempfile.mkdtemp(prefix="mvzt-"))
    try:
        yield d
    finally:
        zygote.stop_shared(d)
        shutil.rmtree(d, ignore_errors=True)


def _status(d: Path) -> tuple[int, int] | None:
    """``(pid, forks served)`` from the one pid file in ``d``, None when there is none."""
    files = list(d.glob("zygote-*.pid"))
    if not files:
        return None
    assert len(files) == 1, files
    pid, served = files[0].read_text().split()
    return int(pid), int(served)


def _cli(env: dict[str, str], *argv: str) -> None:
    r = microvm_cli(*argv, env=env, timeout=180)
    assert r.stdout == b"zyg\n", r.stdout


@pytest.mark.vm
@pytest.mark.timeout(400)
def test_second_run_forks_from_the_lingering_zygote(sandbox_home: Path, zdir: Path) -> None:
    require_binaries("qemu-system-x86_64")
    busybox_image(rootfs.ImageStore(), IMG)
    env = {**os.environ, "MICROVM_ZYGOTE_DIR": str(zdir), "MICROVM_ZYGOTE_IDLE_S": "120"}
    env.pop("MICROVM_ZYGOTE", None)
    _cli(env, "run", "--rm", "--net", "none", IMG, "echo", "zyg")
    first = _status(zdir)
    assert first is not None and first[1] == 1, first   # it forked the first supervisor
    assert process_alive(first[0], None)                  # and outlived the command
    _cli(env, "run", "--rm", "--net", "none", IMG, "echo", "zyg")
    assert _status(zdir) == (first[0], 2)                 # the same zygote forked the second
    assert zygote.stop_shared(zdir) == 1
    assert not process_alive(first[0], None)
    assert _status(zdir) is None and not list(zdir.glob("*.sock"))


def test_microvm_zygote_0_starts_none(zdir: Path) -> None:
    env = {**os.environ, "MICROVM_ZYGOTE_DIR": str(zdir), "MICROVM_ZYGOTE": "0"}
    code = ("from microvm._cli_util import prestart_supervisor, supervisor_ready\n"
            "prestart_supervisor(); supervisor_ready(5)\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert list(zdir.iterdir()) == []


def _start_listening(zdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Start a shared zygote in ``zdir`` (as the CLI does); its socket path once it listens."""
    monkeypatch.setenv("MICROVM_ZYGOTE_DIR", str(zdir))
    monkeypatch.setenv("MICROVM_ZYGOTE_IDLE_S", "60")
    path = zygote._socket_path(os.environ)
    zygote._start_shared(path)
    deadline = time.monotonic() + 60
    while _status(zdir) is None:
        assert time.monotonic() < deadline, "the shared zygote did not start"
        time.sleep(0.02)
    return path


@pytest.mark.root
def test_another_uid_is_refused(zdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_binaries("setpriv")
    path = _start_listening(zdir, monkeypatch)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:   # ours: served
        s.settimeout(60)
        s.connect(str(path))
        assert s.recv(16) == b"R"
    zdir.chmod(0o711)        # opened up (a misconfiguration): only SO_PEERCRED stands
    path.chmod(0o666)
    client = ("import socket, sys\n"
              "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
              "s.settimeout(60)\n"
              "s.connect(sys.argv[1])\n"
              "sys.stdout.write(repr(s.recv(16)))\n")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "/usr/bin/python3", "-I", "-S", "-c", client, str(path)],
                       capture_output=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stdout == b"b''", r.stdout     # connected, then closed without "ready"
    zdir.chmod(0o700)
    st = _status(zdir)
    assert st is not None and process_alive(st[0], None)  # and it still serves


def test_runtime_dir_refuses_foreign_or_open_directories(tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    assert zygote.runtime_dir({"MICROVM_ZYGOTE_DIR": str(ok)}) == ok
    assert ok.stat().st_mode & 0o777 == 0o700
    opened = tmp_path / "open"
    opened.mkdir(mode=0o755)
    opened.chmod(0o755)
    with pytest.raises(PermissionError):
        zygote.runtime_dir({"MICROVM_ZYGOTE_DIR": str(opened)})
    if os.getuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(PermissionError):
            zygote.runtime_dir({"MICROVM_ZYGOTE_DIR": str(foreign)})
