"""Machine snapshots end to end (QEMU; TCG here): one booted guest, snapshotted with a
running process and files; restores carry on, diverge, get their own identity; bad
snapshots are refused with one clear error."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm import Machine, build_ext4
from microvm._snapshot import verify
from microvm.agent import agent_binary
from microvm.backends import Disk
from microvm.errors import AgentError, BackendUnavailable, SnapshotError
from microvm.kernel import Kernel
from tests.support import require_binaries

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done"


def _sh(m: Machine, script: str) -> str:
    r = m.agent.exec("/bin/sh", ["-c", script])
    assert r.exit_code == 0, (script, r.stdout, r.stderr)
    return r.stdout.decode()


def _counter(m: Machine) -> int:
    return int(_sh(m, "cat /tmp/counter").strip() or 0)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("snapm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def source(kernel: Kernel, busybox_root: Path, work: Path) -> Iterator[Machine]:
    require_binaries("qemu-system-x86_64", "mkfs.ext4")
    img = build_ext4(busybox_root, work / "root.img", agent=agent_binary(), free_mib=32)
    ro = work / "ro.img"
    ro.write_bytes(b"read-only data disk\n" * 4096)
    m = Machine("qemu", kernel=kernel, disks=[img, Disk(ro, readonly=True)], memory=256,
                bootstrap={"hostname": "source"})
    m.disks_ro = ro  # type: ignore[attr-defined]
    m.start()
    yield m
    m.kill()


@pytest.fixture(scope="module")
def snap(source: Machine, work: Path) -> Path:
    _sh(source, "mkdir -p /tmp /data")
    _sh(source, f"({COUNTER}) >/dev/null 2>&1 &")
    _sh(source, "echo in-tmp > /tmp/file && echo on-disk > /data/file && sync")
    deadline = time.monotonic() + 10
    while _counter(source) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    path = work / "snap"
    manifest = source.snapshot(path, extra={"note": "test"})
    assert manifest["memory"] == "file" and manifest["extra"] == {"note": "test"}
    assert set(manifest["files"]) == {"state", "memory", "disk0.img"}   # the ro disk is not copied
    assert [d["readonly"] for d in manifest["config"]["disks"]] == [False, True]
    return path


def test_restore_twice_carries_on_and_diverges(source: Machine, snap: Path, work: Path,
                                               kernel: Kernel) -> None:
    a = Machine.restore(snap, kernel=kernel, hostname="fork-a", rundir=work / "ra")
    b = Machine.restore(snap, kernel=kernel, hostname="fork-b", rundir=work / "rb")
    try:
        for m, name in ((a, "fork-a"), (b, "fork-b")):
            assert _sh(m, "cat /tmp/file /data/file") == "in-tmp\non-disk\n"
            assert _sh(m, "hostname").strip() == name
            first = _counter(m)
            deadline = time.monotonic() + 10
            while _counter(m) <= first and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _counter(m) > first, "the background process did not carry on"
        _sh(a, "echo only-a > /data/a && echo only-a > /tmp/a && sync")
        _sh(b, "echo only-b > /data/b && sync")
        assert "only-a" not in _sh(b, "cat /data/a /tmp/a 2>&1; true")
        assert "only-b" not in _sh(a, "cat /data/b 2>&1; true")
        assert "only-a" not in _sh(source, "cat /data/a /tmp/a 2>&1; true")
        assert _sh(source, "hostname").strip() == "source"
        # fresh entropy per restore: the CRNG does not repeat across restores
        ra = a.agent.exec("/bin/sh", ["-c", "head -c 64 /dev/urandom | od -An -tx1"]).stdout
        rb = b.agent.exec("/bin/sh", ["-c", "head -c 64 /dev/urandom | od -An -tx1"]).stdout
        assert ra and ra != rb
        # the clock was stepped to the host's
        guest = int(_sh(a, "date +%s"))
        assert abs(guest - time.time()) < 30
    finally:
        a.kill()
        b.kill()
    verify(snap, full=True)   # the snapshot itself never changed


def test_restore_of_a_restore_streams_its_ram(snap: Path, work: Path, kernel: Kernel) -> None:
    a = Machine.restore(snap, kernel=kernel, rundir=work / "rc")
    try:
        _sh(a, "echo second > /tmp/second")
        man = a.snapshot(work / "snap2", checksums=False)
        assert man["memory"] == "stream" and "memory" not in man["files"]
        c = Machine.restore(work / "snap2", kernel=kernel, rundir=work / "rd")
        try:
            assert _sh(c, "cat /tmp/second /tmp/file") == "second\nin-tmp\n"
        finally:
            c.kill()
    finally:
        a.kill()
        shutil.rmtree(work / "snap2", ignore_errors=True)


def _copy(snap: Path, dst: Path) -> Path:
    shutil.copytree(snap, dst)
    for f in dst.iterdir():
        f.chmod(0o600)
    return dst


def test_corrupted_or_mismatched_snapshots_are_refused(source: Machine, snap: Path,
                                                       work: Path, kernel: Kernel) -> None:
    bad = _copy(snap, work / "trunc")
    with open(bad / "memory", "r+b") as f:
        f.truncate(1 << 20)
    with pytest.raises(SnapshotError, match=r"memory is 1048576 bytes, the manifest says"):
        Machine.from_snapshot(bad, kernel=kernel)

    bad = _copy(snap, work / "edited")
    man = json.loads((bad / "manifest.json").read_text())
    man["config"]["memory_mib"] = 512
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(SnapshotError, match="checksum does not match"):
        Machine.from_snapshot(bad, kernel=kernel)

    bad = _copy(snap, work / "state")
    with open(bad / "state", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    with pytest.raises(SnapshotError, match="device state's sha256"):
        Machine.from_snapshot(bad, kernel=kernel)

    other = work / "other-kernel.elf"
    shutil.copy(kernel.elf, other)
    with open(other, "ab") as f:
        f.write(b"\0")
    with pytest.raises(SnapshotError, match="taken with another kernel"):
        Machine.from_snapshot(snap, kernel=other)

    ro: Path = source.disks_ro  # type: ignore[attr-defined]
    saved = ro.read_bytes()
    try:
        ro.write_bytes(b"another image\n" * 4096)
        with pytest.raises(SnapshotError, match="not the image the snapshot was taken with"):
            Machine.from_snapshot(snap, kernel=kernel)
    finally:
        ro.write_bytes(saved)

    with pytest.raises(SnapshotError, match="does not exist"):
        Machine.from_snapshot(work / "nope", kernel=kernel)
    with pytest.raises(SnapshotError, match="already exists"):
        source.snapshot(snap)
    for d in ("trunc", "edited", "state"):
        shutil.rmtree(work / d)


def test_pause_resume(source: Machine) -> None:
    source.pause()
    try:
        with pytest.raises((AgentError, TimeoutError)):   # a paused guest does not answer
            source.agent.ping(timeout=0.5)
    finally:
        source.resume()
    assert source.agent.ping(timeout=10) > 0


def test_libkrun_has_no_snapshots(tmp_path: Path) -> None:
    from microvm.backends._libkrun import LibkrunBackend

    with pytest.raises(BackendUnavailable, match="snapshots need the QEMU backend"):
        Machine(LibkrunBackend(), kernel=tmp_path / "k", disks=[tmp_path / "d"], snapshots=True)
    m = Machine(LibkrunBackend(), kernel=tmp_path / "k", disks=[tmp_path / "d"])
    with pytest.raises(BackendUnavailable, match="snapshots need the QEMU backend"):
        m.snapshot(tmp_path / "s")
    assert os.listdir(tmp_path) == []
