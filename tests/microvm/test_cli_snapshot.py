"""``microvm run --from-snapshot``, ``fork``, ``pause``/``resume`` and ``snapshot
export/import`` through the real CLI (subprocesses) against real guests.

One network-less source sandbox (``clisnapsrc``, started with ``run -d``: its image
command runs in the background) and one snapshot of it (``clibase``) are shared by the
module; restores without a network avoid the known re-addressing hang (issue 16), which
``test_snapshot_sandbox.py`` covers with networked restores. The teardown of
``sandbox_home`` proves nothing is left.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import rootfs
from tests.microvm.sandbox_fixtures import (  # noqa: F401
    busybox_image,
    microvm_cli,
    sandbox_home_fixture,
)
from tests.support import require_binaries

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

DAEMON_IMG = "local/busybox-daemon:1"
SRC = "clisnapsrc"
SNAP = "clibase"


def cli(*argv: str, check: int | None = 0, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``microvm ARGV`` in a subprocess (text output); with ``check``, assert that exit status."""
    return microvm_cli(*argv, text=True, check=check, timeout=timeout)


def _names(all_: bool = True) -> list[str]:
    return cli("ls", *(["-a"] if all_ else []), "-q").stdout.split()


@pytest.fixture(scope="module")
def snap(sandbox_home: Path) -> Iterator[str]:
    require_binaries("qemu-system-x86_64", "tar", "zstd")
    # an image whose command keeps a process running: `run -d IMAGE` starts it
    busybox_image(rootfs.ImageStore(), DAEMON_IMG, config={
        "Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", "echo main > /tmp/main; sleep 100000"]})
    try:
        assert cli("run", "-d", "--name", SRC, "--net", "none", "-m", "256m",
                   DAEMON_IMG).stdout.strip() == SRC
        # the image's command ran in the background (docker's `run -d IMAGE`)
        assert cli("exec", SRC, "sh", "-c",
                   "for i in $(seq 50); do [ -s /tmp/main ] && break; sleep 0.1; done; "
                   "cat /tmp/main").stdout == "main\n"
        cli("exec", SRC, "sh", "-c", "echo warm > /tmp/state")
        assert cli("snapshot", "create", SRC, SNAP).stdout.strip() == SNAP
        yield SNAP
    finally:
        cli("snapshot", "rm", SNAP, check=None)
        cli("rm", "-f", SRC, check=None)


def test_run_rm_from_snapshot_carries_state_and_exit_status(snap: str) -> None:
    r = cli("run", "--rm", "--name", "clisr1", "--from-snapshot", snap,
            "sh", "-c", "cat /tmp/state; hostname; exit 4", check=4)
    assert r.stdout == "warm\nclisr1\n"
    assert "clisr1" not in _names()


def test_run_detached_from_snapshot_with_label(snap: str) -> None:
    r = cli("run", "-d", "--from-snapshot", snap, "--name", "clisr2", "--label", "team=snap")
    assert r.stdout.strip() == "clisr2"
    try:
        # the snapshot's processes carry on; no second copy of the image command started
        assert cli("exec", "clisr2", "cat", "/tmp/state").stdout == "warm\n"
        procs = cli("exec", "clisr2", "sh", "-c",
                    "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done "
                    "| grep -cx 'sleep 100000 '").stdout
        assert procs.strip() == "1"
        assert cli("ls", "--filter", "label=team=snap", "-q").stdout.split() == ["clisr2"]
        info = json.loads(cli("inspect", "clisr2").stdout)
        assert info["state"] == "running"
    finally:
        cli("rm", "-f", "clisr2")


def test_from_snapshot_refusals_are_one_line(snap: str) -> None:
    before = _names()
    for flags, flag in ((["-m", "1g"], "-m/--memory"), (["-v", "/tmp:/x"], "-v/--volume"),
                        (["-e", "A=1"], "-e/--env"), (["--net", "none"], "--net")):
        r = cli("run", "--rm", *flags, "--from-snapshot", snap, "true", check=2)
        assert len(r.stderr.strip().splitlines()) == 1 and flag in r.stderr, r.stderr
    r = cli("run", "--rm", "--from-snapshot", "no-such-snap", "true", check=125)
    assert len(r.stderr.strip().splitlines()) == 1 and "no-such-snap" in r.stderr
    r = cli("run", "--rm", check=2)
    assert "missing IMAGE" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("run", "-d", "--from-snapshot", snap, "--name", SRC, check=125)   # name taken
    assert len(r.stderr.strip().splitlines()) == 1 and SRC in r.stderr
    assert _names() == before


def test_export_import_then_run_from_the_imported_snapshot(snap: str, tmp_path: Path) -> None:
    archive = tmp_path / "base.tar.zst"
    assert cli("snapshot", "export", snap, str(archive)).stdout.strip() == str(archive)
    assert cli("snapshot", "import", str(archive), "clibase2").stdout.strip() == "clibase2"
    try:
        assert sorted(cli("snapshot", "ls", "-q").stdout.split()) == [snap, "clibase2"]
        r = cli("run", "--rm", "--from-snapshot", "clibase2", "cat", "/tmp/state")
        assert r.stdout == "warm\n"
    finally:
        cli("snapshot", "rm", "clibase2")
    r = cli("snapshot", "import", str(tmp_path / "missing.tar.zst"), "x", check=125)
    assert len(r.stderr.strip().splitlines()) == 1


def test_fork_pause_resume(snap: str) -> None:
    r = cli("fork", SRC, "-n", "2", "--name", "a", check=2)      # one --name per fork
    assert len(r.stderr.strip().splitlines()) == 1
    names = cli("fork", SRC, "-n", "2").stdout.split()
    try:
        assert len(names) == 2
        for n in names:
            assert cli("exec", n, "sh", "-c", "cat /tmp/state; hostname").stdout == f"warm\n{n}\n"
    finally:
        if names:
            cli("rm", "-f", *names)
    assert cli("pause", SRC).stdout.strip() == SRC
    assert cli("resume", SRC).stdout.strip() == SRC
    assert cli("exec", SRC, "cat", "/tmp/state").stdout == "warm\n"
    r = cli("pause", "no-such-sandbox", check=125)
    assert "no-such-sandbox" in r.stderr
