"""``microvm vm run`` leaves nothing behind: SIGTERM/SIGHUP clean up, SIGKILL leftovers are swept.

Each test gives the CLI its own ``TMPDIR`` so its ``microvm-run-*`` directory is easy to watch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microvm.backends._rundir import OWNER_FILE, owned_tempdir, owner_alive, sweep_stale
from tests.support import require_binaries

pytestmark = pytest.mark.vm


def _start_vm_run(busybox_root: Path, temp: Path) -> subprocess.Popen[bytes]:
    """A `vm run` whose command prints a marker and then sleeps; returns once the marker arrived."""
    require_binaries("qemu-system-x86_64", "mkfs.ext4", "debugfs")
    temp.mkdir(exist_ok=True)
    p = subprocess.Popen(
        [sys.executable, "-m", "microvm", "vm", "run", "--rootfs-dir", str(busybox_root),
         "--memory", "256", "--", "/bin/sh", "-c", "echo RUNNING; sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(temp)},
    )  # fmt: skip
    assert p.stdout is not None
    line = p.stdout.readline()  # blocks until the guest command runs (or the CLI dies)
    if line != b"RUNNING\n":
        p.kill()
        _, err = p.communicate(timeout=30)
        pytest.fail(f"vm run did not start its command: {line!r} {err.decode(errors='replace')}")
    return p


def _qemu_pids_under(temp: Path) -> list[int]:
    """QEMU processes whose command line mentions ``temp`` (its disk and sockets live there)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and argv and b"qemu" in argv[0] and str(temp).encode() in b" ".join(argv):
            pids.append(int(d.name))
    return pids


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_removes_run_dir_and_vm(
    busybox_root: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    temp = tmp_path / "t"
    p = _start_vm_run(busybox_root, temp)
    try:
        runs = list(temp.glob("microvm-run-*"))
        assert len(runs) == 1 and (runs[0] / "root.img").is_file()
        assert _qemu_pids_under(temp)
        p.send_signal(signum)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 128 + signum, err
    assert b"Traceback" not in err, err
    assert not list(temp.glob("microvm-run-*"))
    deadline = time.monotonic() + 10
    while _qemu_pids_under(temp) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _qemu_pids_under(temp)


def test_sigkill_leftover_is_swept_by_the_next_run(busybox_root: Path, tmp_path: Path) -> None:
    """SIGKILL skips every cleanup: the run dir stays, with a dead owner; the next sweep removes it."""
    temp = tmp_path / "t"
    p = _start_vm_run(busybox_root, temp)
    try:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
        p.wait()
    runs = list(temp.glob("microvm-run-*"))
    assert len(runs) == 1 and owner_alive(runs[0]) is False
    live = owned_tempdir("microvm-run-", parent=temp)  # ours: alive, must stay
    foreign = temp / "microvm-run-noowner"  # no owner record: not ours to judge
    foreign.mkdir()
    assert sweep_stale(parent=temp) == runs
    assert sorted(temp.iterdir()) == sorted([live, foreign])


def test_owner_record_detects_pid_reuse(tmp_path: Path) -> None:
    d = owned_tempdir("microvm-run-", parent=tmp_path)
    pid, start = (d / OWNER_FILE).read_text().split()
    assert int(pid) == os.getpid() and owner_alive(d) is True
    (d / OWNER_FILE).write_text(f"{pid} {int(start) + 1}\n")  # same pid, another process
    assert owner_alive(d) is False
    (d / OWNER_FILE).write_text("1 not-a-start-time\n")  # pid 1 runs, but it is not the owner
    assert owner_alive(d) is False
    (d / OWNER_FILE).write_text("garbage")
    assert owner_alive(d) is None
    with pytest.raises(ValueError, match="bad prefix 'tmp-'"):
        owned_tempdir("tmp-", parent=tmp_path)
