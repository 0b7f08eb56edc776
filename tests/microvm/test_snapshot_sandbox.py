"""Sandbox snapshots, restore, fork, pause/resume, export/import and the warm pool end to
end (QEMU TCG, real network: root). One source sandbox for the module."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rootfs
from microvm import Sandbox
from microvm.errors import SandboxConfigError, SnapshotError
from microvm.sandbox._netwiring import can_create_tap
from microvm.sandbox._snapshots import (
    export_snapshot,
    import_snapshot,
    list_snapshots,
    remove_snapshot,
    snapshots_root,
)
from tests.microvm.sandbox_fixtures import busybox_image, sandbox_home_fixture  # noqa: F401
from tests.support import cmdline, ppid, require_binaries

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done"


def _counter(sb: Sandbox) -> int:
    return int(sb.shell("cat /tmp/counter").stdout_text.strip() or 0)


def _identity(sb: Sandbox) -> tuple[str, str]:
    out = sb.shell("cat /sys/class/net/eth0/address; ip -4 addr show eth0").stdout_text
    mac = out.splitlines()[0].strip()
    ip = re.search(r"inet (\S+)", out)
    assert ip, out
    return mac, ip.group(1)


def _carries_on(sb: Sandbox) -> bool:
    first = _counter(sb)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _counter(sb) > first:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def source(sandbox_home: Path) -> Iterator[Sandbox]:
    require_binaries("qemu-system-x86_64", "tar", "zstd")   # tar, zstd: a foreign archive
    if not can_create_tap():
        pytest.skip("needs root for the sandbox network (TAP uplink)")
    img = busybox_image(rootfs.ImageStore())
    sb = Sandbox.create("src", image=img, memory=256, network="public_only")
    sb.shell(f"({COUNTER}) >/dev/null 2>&1 &")
    sb.shell("echo in-tmp > /tmp/file && echo on-disk > /root/file && sync")
    yield sb
    sb.stop()
    Sandbox.remove("src")


@pytest.fixture(scope="module")
def warm(source: Sandbox) -> str:
    assert _carries_on(source)
    info = source.snapshot("warm")
    assert info.source == "src" and info.memory_mib == 256
    assert [s.name for s in list_snapshots()] == ["warm"]
    return "warm"


def test_restore_twice_diverges_with_own_identity(source: Sandbox, warm: str) -> None:
    a = Sandbox.restore(warm, name="ra")
    b = Sandbox.restore(warm, name="rb")
    try:
        for sb in (a, b):
            assert sb.shell("cat /tmp/file /root/file").stdout_text == "in-tmp\non-disk\n"
            assert _carries_on(sb), "the background process did not survive the restore"
        assert a.shell("hostname").stdout_text.strip() == "ra"
        a.shell("echo only-a > /root/a && sync")
        assert not b.fs.exists("/root/a") and not source.fs.exists("/root/a")
        ids = {_identity(s) for s in (source, a, b)}
        assert len({m for m, _ in ids}) == 3 and len({ip for _, ip in ids}) == 3, ids
        rnd = {s.shell("head -c 64 /dev/urandom | od -An -tx1").stdout_text for s in (a, b)}
        assert len(rnd) == 2
        # each restore's own gateway carries its DNS
        for sb in (a, b):
            out = sb.shell("nslookup -type=a host.microvm.internal").stdout_text
            assert "Address" in out, out
            assert sb.network.stats()["guest_frames"] > 0
    finally:
        for sb in (a, b):
            sb.stop()
            Sandbox.remove(sb.name)


def test_fork_five_running_sandbox(source: Sandbox) -> None:
    source.shell("echo before-fork > /tmp/forked")
    forks = source.fork_many(5)
    try:
        assert [f.name for f in forks] == [f"src-fork-{k}" for k in range(1, 6)]
        macs = set()
        for f in forks:
            assert f.shell("cat /tmp/forked").stdout_text == "before-fork\n"
            assert f.shell("hostname").stdout_text.strip() == f.name
            macs.add(_identity(f))
            assert "Address" in f.shell("nslookup -type=a host.microvm.internal").stdout_text
        assert len(macs) == 5
        assert _carries_on(source)
        assert not [p for p in snapshots_root().iterdir() if p.name.startswith(".fork-")]
    finally:
        for f in forks:
            f.stop()
            Sandbox.remove(f.name)


def test_pause_resume_keeps_processes_and_clock(source: Sandbox) -> None:
    h = source.exec_stream("/bin/sleep", ["3"])
    source.pause()
    time.sleep(2)
    source.resume()
    assert abs(int(source.shell("date +%s").stdout_text) - time.time()) < 5
    assert h.wait(30).exit_code == 0
    assert _carries_on(source)


def test_export_import_and_refusals(source: Sandbox, warm: str, tmp_path: Path) -> None:
    archive = export_snapshot(warm, tmp_path / "warm.tar.zst")
    info = import_snapshot(archive, "imported")
    assert info.name == "imported"
    c = Sandbox.restore("imported", name="rc")
    try:
        assert c.shell("cat /root/file").stdout_text == "on-disk\n"
    finally:
        c.stop()
        Sandbox.remove("rc")
    remove_snapshot("imported")
    # a corrupted archive is refused on import, nothing kept
    bad = tmp_path / "bad"
    shutil.copytree(snapshots_root() / warm, bad)
    (bad / "disk0.img").chmod(0o600)
    with open(bad / "disk0.img", "r+b") as f:
        f.seek(4096)
        f.write(b"corrupt!")
    export_snapshot(bad, tmp_path / "bad.tar.zst")   # export checks sizes, not content
    with pytest.raises(SnapshotError, match=r"disk0\.img's sha256 does not match"):
        import_snapshot(tmp_path / "bad.tar.zst", "bad")
    assert not (snapshots_root() / "bad").exists()
    # a tarball that is not an export (no sparse map first) is refused, nothing kept
    subprocess.run(["tar", "-I", "zstd", "-cf", str(tmp_path / "plain.tar.zst"), "-C",
                    str(bad), "."], check=True)
    with pytest.raises(SnapshotError, match="not a snapshot archive"):
        import_snapshot(tmp_path / "plain.tar.zst", "plain")
    assert not (snapshots_root() / "plain").exists()
    assert [p.name for p in snapshots_root().iterdir()] == [warm]
    # a snapshot of another image digest is refused before anything starts
    man = json.loads((snapshots_root() / warm / "manifest.json").read_text())
    lower = [d for d in man["config"]["disks"] if d["readonly"]]
    assert lower, "the image's lower disk is pinned, not copied"
    with pytest.raises(SnapshotError, match="already exists"):
        source.snapshot(warm)
    with pytest.raises(SnapshotError, match="does not exist"):
        Sandbox.restore("no-such-snapshot", name="x")
    with pytest.raises(SandboxConfigError):
        source.fork_many(0)
    assert [i.name for i in Sandbox.list()] == ["src"]


def test_disk_snapshot_boots_cold_and_moves(source: Sandbox, tmp_path: Path) -> None:
    """A disk-only snapshot: the upper disk on the pinned image; a restore boots cold from
    it (files on disk, not /tmp or processes); exported and imported like a full one."""
    info = source.snapshot("dsnap", disk_only=True)
    assert info.kind == "disk" and info.source == "src"
    assert sorted(p.name for p in info.path.iterdir()) == ["manifest.json", "upper.img"]
    assert _carries_on(source)   # the source was paused for the copy only
    archive = export_snapshot("dsnap", tmp_path / "d.tar.zst")
    assert archive.stat().st_size < info.size   # holes stay holes, data compressed
    assert import_snapshot(archive, "dsnap2").kind == "disk"
    d = Sandbox.restore("dsnap2", name="rd")
    try:
        out = d.shell("cat /root/file; test -e /tmp/file || echo no-tmp; hostname").stdout_text
        assert out == "on-disk\nno-tmp\nrd\n"
        assert d.shell("test -e /tmp/counter || echo cold").stdout_text == "cold\n"
    finally:
        d.stop()
        Sandbox.remove("rd")
    for n in ("dsnap", "dsnap2"):
        remove_snapshot(n)
    assert not (snapshots_root() / "dsnap").exists()


def _procs_of(*names: str) -> set[int]:
    """Pids of processes whose command line names one of these sandboxes' directories
    (their QEMUs: rundir sockets; supervisors: sandbox dir)."""
    from microvm.sandbox._paths import SandboxPaths

    marks = [str(SandboxPaths.of(n).run) + "/" for n in names]
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            cmd = cmdline(int(d.name))
            if "qemu" in cmd and any(m in cmd for m in marks):
                out.add(int(d.name))
    return out


def test_fork_freezes_source_in_place(source: Sandbox, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    """A network-less running sandbox started with MICROVM_FORK_IN_PLACE=1 and forked:
    its RAM memfd becomes the template (never copied) and it carries on as a copy-on-write
    child beside the forks, same name, relay and disks; nothing of the template is left
    once the children are gone."""
    monkeypatch.setenv("MICROVM_FORK_IN_PLACE", "1")
    c = Sandbox.create("csrc", image=busybox_image(rootfs.ImageStore()), memory=256,
                       network="none")
    forks: list[Sandbox] = []
    try:
        c.shell(f"({COUNTER}) >/dev/null 2>&1 &")
        c.shell("echo on-disk > /root/file && sync")
        qemu_before = _procs_of("csrc")
        assert len(qemu_before) == 1
        forks = c.fork_many(2)
        assert not [p for p in snapshots_root().iterdir() if p.name.startswith(".fork-")]
        qemu_after = _procs_of("csrc")
        # the source's VMM was replaced (a copy-on-write child of the template)
        assert len(qemu_after) == 1 and not qemu_before & qemu_after
        ram = (Path("/proc") / str(next(iter(qemu_after))) / "maps").read_text()
        assert "memfd:microvm-ram" in ram   # the frozen memfd, mapped private
        assert _carries_on(c)
        assert c.shell("hostname; cat /root/file").stdout_text == "csrc\non-disk\n"
        rng = {f.shell("head -c 32 /dev/urandom | od -An -tx1").stdout_text for f in forks}
        rng.add(c.shell("head -c 32 /dev/urandom | od -An -tx1").stdout_text)
        assert len(rng) == 3
        for f in forks:
            assert _carries_on(f)
            assert f.shell("cat /root/file").stdout_text == "on-disk\n"
        c.shell("echo source-only > /root/file2 && sync")
        forks[0].shell("echo fork-only > /root/file3 && sync")
        assert forks[1].shell("cat /root/file2 /root/file3 2>&1 | wc -l").stdout_text.strip() \
            == "2"   # two "No such file" lines: nothing shared after the fork
        assert c.shell("cat /root/file2").stdout_text == "source-only\n"
        # a second fork of the (now copy-on-write) source snapshots it instead
        again = c.fork(name="csrc-again")
        forks.append(again)
        assert again.shell("cat /root/file2").stdout_text == "source-only\n"
    finally:
        for f in forks:
            f.stop()
            Sandbox.remove(f.name)
        c.stop()
        Sandbox.remove("csrc")
    assert _procs_of("csrc", *(f.name for f in forks)) == set()
    assert not [p for p in snapshots_root().iterdir() if p.name.startswith(".")]


def test_pool_hands_out_and_refills(source: Sandbox, warm: str) -> None:
    """The pool's own mechanics, from a snapshot of a sandbox without a network (the
    restore and fork tests above cover networked restores). The module's ``warm``
    snapshot is removed at the end whatever happens (the CLI test below expects an empty
    snapshot list)."""
    from microvm import Pool

    psrc = Sandbox.create("psrc", image=busybox_image(rootfs.ImageStore()), memory=256,
                          network="none")
    try:
        psrc.shell("echo in-tmp > /tmp/file && sync")
        psrc.snapshot("pwarm")
        with Pool("pwarm", size=2) as pool:
            pool.wait_ready(timeout=120)
            a = pool.acquire()
            b = pool.acquire()
            assert a.name != b.name
            # restores after the first start are forked by this process's warm zygote
            # and show a supervisor's command line
            from microvm.sandbox import _zygote as zygote
            from microvm.sandbox._paths import SandboxPaths

            z = zygote._ZYGOTE
            assert z is not None and z.ready.is_set()
            for sb in (a, b):
                pid = sb.info().pid
                assert pid is not None and ppid(pid) == z.proc.pid
                cmd = cmdline(pid)
                assert f"microvm.sandbox._supervisor {SandboxPaths.of(sb.name).dir}" in cmd
            assert a.shell("cat /tmp/file").stdout_text == "in-tmp\n"
            pool.release(a)
            pool.wait_ready(timeout=120)
            assert pool.ready == 2
            names = {i.name for i in Sandbox.list()}
            assert b.name in names and a.name not in names
        assert {i.name for i in Sandbox.list()} == {"src", "psrc"}
    finally:
        for snap in ("pwarm", warm):
            with contextlib.suppress(Exception):
                remove_snapshot(snap)
        psrc.stop()
        Sandbox.remove("psrc")
    assert list_snapshots() == []


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microvm", *argv], capture_output=True,
                          text=True, timeout=300)


def test_cli_snapshot_fork_pause_resume(source: Sandbox) -> None:
    r = _cli("snapshot", "create", "src", "clisnap")
    assert r.returncode == 0 and r.stdout.strip() == "clisnap", r.stderr
    r = _cli("snapshot", "ls", "--format", "json")
    assert [s["name"] for s in json.loads(r.stdout)] == ["clisnap"]
    assert [s["source"] for s in json.loads(r.stdout)] == ["src"]
    r = _cli("snapshot", "create", "src", "clisnap")
    assert r.returncode == 125 and "already exists" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _cli("fork", "src", "-n", "2")
    assert r.returncode == 0, r.stderr
    names = r.stdout.split()
    try:
        assert len(names) == 2
        for n in names:
            f = Sandbox.get(n)
            assert f.shell("hostname").stdout_text.strip() == n
            f.close()
    finally:
        for n in names:
            Sandbox.get(n).stop()
            Sandbox.remove(n)
    r = _cli("snapshot", "restore", "clisnap")
    assert r.returncode == 0 and r.stdout.strip() == "clisnap-1", r.stderr
    Sandbox.get("clisnap-1").stop()
    Sandbox.remove("clisnap-1")
    assert _cli("pause", "src").stdout.strip() == "src"
    assert _cli("resume", "src").returncode == 0
    assert _carries_on(source)
    r = _cli("snapshot", "rm", "clisnap", "no-such")
    assert r.returncode == 125 and "'no-such'" in r.stderr and r.stdout.strip() == "clisnap"
    assert _cli("snapshot", "ls", "-q").stdout == ""
    assert [i.name for i in Sandbox.list()] == ["src"]
