"""Boot benchmark: ``Machine`` start-to-first-exec-result vs a bare boot (same QEMU flags and kernel).

The floor is the same kernel booting a static init that prints one line and
reboots; ``boot_ratio`` = bare / machine (> 1 would mean faster than the floor;
the target is >= 1/1.2). Also exec round-trip latency and fs throughput
through the agent.

    python -m benchmarks.boot [--quick]     # last line: one JSON object
    python -m pytest benchmarks/boot.py     # pytest-benchmark
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import quick_main
from benchmarks._microvm_bare import bare_boot_once, build_bare_disk
from microvm.kernel import Kernel, ensure_kernel

MEMORY_MIB = 512


def build_agent_disk(work: Path) -> Path:
    """An ext4 root with busybox (when installed) and the real agent."""
    import os
    import shutil
    import subprocess

    from microvm import build_ext4
    from microvm.agent import agent_binary

    root = work / "agent-root"
    (root / "bin").mkdir(parents=True, exist_ok=True)
    bb = shutil.which("busybox")
    if bb:
        shutil.copy2(bb, root / "bin" / "busybox")
        for a in subprocess.run([bb, "--list"], capture_output=True, text=True).stdout.split():
            if a != "busybox" and not (root / "bin" / a).exists():
                os.symlink("busybox", root / "bin" / a)
    return build_ext4(root, work / "agent.img", agent=agent_binary(), free_mib=64)


def machine_first_exec_once(kernel: Kernel, disk: Path) -> float:
    """Seconds from Machine.start() to the result of the first exec (/bin/true)."""
    from microvm import Machine

    t0 = time.perf_counter()
    m = Machine("qemu", kernel=kernel, disks=[disk], memory=MEMORY_MIB).start()
    try:
        r = m.agent.exec("/bin/true", [])
        dt = time.perf_counter() - t0
        if r.exit_code != 0:
            raise RuntimeError(f"/bin/true exited {r.exit_code}")
        return dt
    finally:
        m.shutdown()


def exec_and_fs(kernel: Kernel, disk: Path, n_exec: int, fs_mib: int) -> dict[str, float]:
    """Exec round-trip (median ms) and fs write/read MiB/s through the agent on one booted machine."""
    from microvm import Machine

    out: dict[str, float] = {}
    with Machine("qemu", kernel=kernel, disks=[disk], memory=MEMORY_MIB) as m:
        a = m.agent
        lat = []
        for _ in range(n_exec):
            t = time.perf_counter()
            a.exec("/bin/true", [])
            lat.append(time.perf_counter() - t)
        out["exec_rtt_ms"] = statistics.median(lat) * 1000
        data = bytes(range(256)) * (fs_mib * 4096)
        if hasattr(a, "write_file") and hasattr(a, "read_file"):
            t = time.perf_counter()
            a.write_file("/tmp/bench.bin", data)
            out["fs_write_mib_s"] = fs_mib / (time.perf_counter() - t)
            t = time.perf_counter()
            back = a.read_file("/tmp/bench.bin")
            out["fs_read_mib_s"] = fs_mib / (time.perf_counter() - t)
            if back != data:
                raise RuntimeError("fs round-trip corrupted data")
    return out


def run(quick: bool) -> dict[str, Any]:
    """Measure everything; returns the JSON-able result."""
    kernel = ensure_kernel()
    rounds = 5 if quick else 10
    res: dict[str, Any] = {"rounds": rounds, "memory_mib": MEMORY_MIB}
    with tempfile.TemporaryDirectory(prefix="bench-boot-") as tmp:
        work = Path(tmp)
        bare = build_bare_disk(work)
        try:
            disk: Path | None = build_agent_disk(work)
        except Exception as e:  # agent not buildable here: report the floor only
            res["machine_error"] = f"{type(e).__name__}: {e}"
            disk = None
        # Interleave the two so background load hits both alike (2 shared cores here).
        bare_print, bare_exit, firsts = [], [], []
        for _ in range(rounds):
            p, e = bare_boot_once(kernel, bare, MEMORY_MIB)
            bare_print.append(p)
            bare_exit.append(e)
            if disk is not None:
                firsts.append(machine_first_exec_once(kernel, disk))
        res["bare_boot_print_s"] = statistics.median(bare_print)
        res["bare_boot_print_min_s"] = min(bare_print)
        res["bare_boot_exit_s"] = statistics.median(bare_exit)
        if disk is None:
            return res
        res["machine_first_exec_s"] = statistics.median(firsts)
        res["machine_first_exec_min_s"] = min(firsts)
        res["boot_ratio"] = res["bare_boot_print_s"] / res["machine_first_exec_s"]
        res["boot_min_ratio"] = res["bare_boot_print_min_s"] / res["machine_first_exec_min_s"]
        res.update(exec_and_fs(kernel, disk, 10 if quick else 50, 4 if quick else 16))
    return res


def test_bare_boot(benchmark, tmp_path) -> None:
    kernel = ensure_kernel()
    disk = build_bare_disk(tmp_path)
    benchmark.pedantic(lambda: bare_boot_once(kernel, disk, MEMORY_MIB), rounds=3, iterations=1)


def test_machine_first_exec(benchmark, tmp_path) -> None:
    kernel = ensure_kernel()
    disk = build_agent_disk(tmp_path)
    benchmark.pedantic(lambda: machine_first_exec_once(kernel, disk), rounds=3, iterations=1)


def main() -> None:
    quick_main(__doc__, run, "5 rounds (under a minute)")


if __name__ == "__main__":
    main()
