"""The ``microvm`` command under load and under signals, against real guests.

* 200 MB of output through ``microvm exec`` reaches our pipe whole while the CLI's own
  peak RSS (``VmHWM`` of the CLI process, sampled from ``/proc`` while it runs) stays
  within 32 MiB of where a 1 kB exec leaves it: the stream is copied, never accumulated
  (80 MB when the guest runs under TCG, see :func:`_big`).
* SIGTERM to an attached ``microvm run --rm`` ends it with 143 (one line at most, no
  traceback) after a full clean-up: no sandbox record, no supervisor or VMM process from
  the module's ``$MICROVM_HOME``, nothing left in the CLI's own ``$TMPDIR``.

Every call is the real CLI in a subprocess with the module's private ``$MICROVM_HOME``
(whose teardown also checks that no process, network object or record is left).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rootfs
from tests.microvm.sandbox_fixtures import (  # noqa: F401
    busybox_image,
    microvm_cli,
    owned_processes,
    sandbox_home_fixture,
)

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(300)]

IMG = "local/busybox:1"
BOX = "clistrm1"
GROWTH_LIMIT_MIB = 32


def _big() -> int:
    """200 MB (the issue's figure) where KVM runs guests; 80 MB under TCG, where the guest
    itself produces ~5 MB/s (still far above the limit: an accumulating CLI would grow by
    the whole stream). ``MICROVM_TEST_STREAM_MB`` sets it."""
    from microvm.backends.base import kvm_usable

    mb = os.environ.get("MICROVM_TEST_STREAM_MB")
    if mb:
        return int(mb) * 1_000_000
    return 200_000_000 if kvm_usable() else 80_000_000


def _cli(*argv: str, check: int | None = 0) -> subprocess.CompletedProcess[bytes]:
    return microvm_cli(*argv, check=check, timeout=120)


def _processes_of(home: Path, name: str) -> list[str]:
    """The live processes (supervisor, VMM, helpers) of sandbox ``name`` under ``home``."""
    from microvm.sandbox._paths import SandboxPaths

    d = (home / "sandboxes" / name).absolute()
    markers = (str(d), str(SandboxPaths(d).run),
               "mvsb-" + hashlib.sha256(str(d).encode()).hexdigest()[:16])
    return [p for p in owned_processes(home) if any(m in p for m in markers)]


def _hwm_kib(pid: int) -> int | None:
    """The process's peak resident set size (``VmHWM``), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _exec_measured(*argv: str) -> tuple[int, int, int]:
    """``microvm exec ARGV`` with its stdout read (and counted) here in 1 MiB chunks.

    Every byte must be NUL (the commands here write ``/dev/zero``). Returns (exit status,
    bytes of stdout, peak RSS of the CLI process in KiB).
    """
    p = subprocess.Popen([sys.executable, "-m", "microvm", "exec", *argv],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            v = _hwm_kib(p.pid)
            if v is not None and p.poll() is None:  # not a zombie's figure
                peak = max(peak, v)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert p.stdout is not None and p.stderr is not None
    total = zeros = 0
    try:
        while chunk := p.stdout.read(1 << 20):
            total += len(chunk)
            zeros += chunk.count(0)
        err = p.stderr.read()
        code = p.wait(timeout=120)
    finally:
        stop.set()
        sampler.join()
        p.kill()
        p.wait()
    assert b"Traceback" not in err, err.decode(errors="replace")
    assert total == zeros, "the stream was altered on the way"
    return code, total, peak


@pytest.fixture(scope="module")
def box(sandbox_home: Path) -> Iterator[str]:
    busybox_image(rootfs.ImageStore())
    _cli("create", "--name", BOX, "--net", "none", IMG)
    yield BOX
    _cli("rm", "-f", BOX)


def test_200mb_output_through_exec_in_constant_memory(box: str) -> None:
    code, n, small_peak = _exec_measured(box, "sh", "-c", "head -c 1000 /dev/zero")
    assert (code, n) == (0, 1000) and small_peak > 0
    big = _big()
    code, n, big_peak = _exec_measured(box, "sh", "-c", f"head -c {big} /dev/zero; exit 4")
    assert (code, n) == (4, big)
    growth_mib = (big_peak - small_peak) / 1024
    assert growth_mib < GROWTH_LIMIT_MIB, (
        f"the CLI's peak RSS grew by {growth_mib:.0f} MiB streaming {big // 1_000_000} MB "
        f"({small_peak} -> {big_peak} KiB)")


def test_sigterm_to_an_attached_run_cleans_everything_up(sandbox_home: Path,
                                                         tmp_path: Path) -> None:
    busybox_image(rootfs.ImageStore())
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    name = "clisigt1"
    p = subprocess.Popen(
        [sys.executable, "-m", "microvm", "run", "--rm", "--name", name, "--net", "none", IMG,
         "sh", "-c", "echo READY; sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    assert p.stdout is not None and p.stderr is not None
    try:
        line = p.stdout.readline()   # the command runs in the guest (or the CLI died)
        assert line == b"READY\n", (line, p.stderr.read() if p.poll() is not None else b"")
        assert _processes_of(sandbox_home, name), "no supervisor/VMM while the run is attached"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=90)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 128 + signal.SIGTERM, err.decode(errors="replace")
    assert b"Traceback" not in err and len(err.splitlines()) <= 1, err.decode(errors="replace")
    assert name not in _cli("ls", "-a", "-q").stdout.decode().split()
    deadline = time.monotonic() + 15          # the VMM may take a moment to be reaped
    while _processes_of(sandbox_home, name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_of(sandbox_home, name) == []
    assert sorted(os.listdir(temp)) == []
    assert not (sandbox_home / "sandboxes" / name).exists()
