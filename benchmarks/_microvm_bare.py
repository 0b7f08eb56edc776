"""Helpers for benchmarks/boot.py: the bare-boot floor (a static init that prints and reboots)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from microvm import build_ext4
from microvm.backends import Disk, QemuBackend, VmSpec
from microvm.kernel import Kernel

MARKER = b"MICROVM-BARE-INIT-UP"

BARE_INIT_C = r"""
#include <unistd.h>
#include <sys/reboot.h>
int main(void) {
    static const char m[] = "MICROVM-BARE-INIT-UP\n";
    if (write(1, m, sizeof m - 1) < 0) {}
    reboot(RB_AUTOBOOT);
    return 0;
}
"""


def build_bare_disk(work: Path) -> Path:
    """An ext4 root whose /.microvm/agent is the bare init."""
    src = work / "bare.c"
    src.write_text(BARE_INIT_C)
    exe = work / "bare-init"
    cc = ["musl-gcc"] if shutil.which("musl-gcc") else ["gcc"]
    subprocess.run([*cc, "-static", "-Os", "-o", str(exe), str(src)], check=True)
    root = work / "bare-root"
    root.mkdir(exist_ok=True)
    return build_ext4(root, work / "bare.img", agent=exe, free_mib=4)


def bare_boot_once(kernel: Kernel, disk: Path, memory_mib: int = 512) -> tuple[float, float]:
    """(seconds to the init's console line, seconds to VMM exit) for one bare boot."""
    with tempfile.TemporaryDirectory(prefix="bare-") as rd:
        spec = VmSpec(kernel=kernel.elf, disks=[Disk(disk)], rundir=Path(rd), memory_mib=memory_mib)
        t0 = time.perf_counter()
        h = QemuBackend().launch(spec)
        try:
            seen = None
            while seen is None:
                if MARKER in spec.console_log.read_bytes():
                    seen = time.perf_counter() - t0
                    break
                if h.poll() is not None and MARKER not in spec.console_log.read_bytes():
                    raise RuntimeError("bare guest exited without printing its marker")
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError("bare guest did not print within 60 s")
                time.sleep(0.002)
            h.wait(timeout=30)
            return seen, time.perf_counter() - t0
        finally:
            h.kill()
