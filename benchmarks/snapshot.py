"""Snapshot benchmark: time to a first exec in a cold sandbox vs a restore vs a fork vs a
warm pool, and the host memory of each extra fork.

Same run, same image (busybox), 256 MiB guests, network ``none`` (a network adds the same
slot/TAP set-up to every path), the paths interleaved per round:

* ``cold_s``: ``Sandbox.create`` + first ``exec("/bin/true")``, median;
* ``restore_s``: ``Sandbox.restore(snapshot)`` + first exec, median;
* ``fork_s``: ``sb.fork()`` of a running sandbox + first exec in the fork, median;
* ``pool_acquire_s``: ``pool.acquire()`` (pool of 2, refilled) + first exec, median;
* ``*_vs_cold_ratio`` = ``cold_s`` / that path (targets: restore, fork >= 20, pool >= 50);
* ``fork_pss_mib``: the rise in summed PSS (QEMU + supervisor of every sandbox) per extra
  fork, over 3 forks of one source;
* ``restore_phases_s``: where the median restore spent its time (seconds since the call
  when the supervisor was requested, ran, checked the snapshot, started QEMU, had the
  agent reconfigured, served, reported; then the first exec's own time);
* why a restore costs what it does under TCG: ``restore_tcg_blocks``, the guest code
  blocks the restored QEMU translated by the end of the first exec (QMP ``info jit``;
  a new QEMU starts with an empty translation cache), and ``restore_first_exec_s`` vs
  ``restore_warm_exec_s``, the first and the second ``/bin/true`` in a restore (medians).

    python -m benchmarks.snapshot [--quick]     # last line: one JSON object
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import rootfs
from benchmarks._common import quick_main
from tests.microvm.sandbox_fixtures import busybox_image

MEMORY_MIB = 256


def _image() -> rootfs.Image:
    return busybox_image(rootfs.ImageStore(), "local/snapbench:1")


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        total += _pss_kib(pid)
        for child in Path("/proc").iterdir():
            if child.name.isdigit():
                try:
                    stat = (child / "stat").read_text()
                except OSError:
                    continue
                if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                    total += _pss_kib(int(child.name))
    return total / 1024


def _tcg_blocks(sb: Any) -> int | None:
    """Translation blocks in ``sb``'s QEMU (``info jit`` over its QMP socket), or None
    (not QEMU TCG, or the monitor did not answer)."""
    import re

    from microvm.backends._qmp import QmpClient

    try:
        with QmpClient.connect(sb.paths.run / "qmp.sock", timeout=5.0) as q:
            text = q.execute("human-monitor-command", {"command-line": "info jit"})
    except Exception:
        return None
    m = re.search(r"TB count\s+(\d+)", str(text))
    return int(m.group(1)) if m else None


def run(quick: bool) -> dict[str, Any]:
    """All paths, interleaved; returns the result keys (see the module docstring)."""
    from microvm import Pool, Sandbox
    from microvm.sandbox._snapshots import restore_phases

    rounds = 3 if quick else 7
    home = tempfile.mkdtemp(prefix="snapbench-home-")
    os.environ["MICROVM_HOME"] = home
    img = _image()
    cold, restore, fork, pool_t = [], [], [], []
    first_exec, warm_exec, blocks = [], [], []
    phases: list[dict[str, float]] = []
    base = Sandbox.create("base", image=img, memory=MEMORY_MIB, network="none")
    base.shell("echo warm > /tmp/warm")
    base.snapshot("warm")
    pool = Pool("warm", size=2, name="bp")
    try:
        for r in range(rounds):
            t0 = time.monotonic()
            c = Sandbox.create(f"cold{r}", image=img, memory=MEMORY_MIB, network="none")
            c.exec("/bin/true")
            cold.append(time.monotonic() - t0)
            c.stop()
            Sandbox.remove(c.name)

            t0 = time.monotonic()
            s = Sandbox.restore("warm", name=f"rest{r}")
            t_up = time.monotonic()
            s.exec("/bin/true")
            t_end = time.monotonic()
            restore.append(t_end - t0)
            first_exec.append(t_end - t_up)
            phases.append({**restore_phases(s.name), "first_exec": round(t_end - t_up, 4)})
            n_blocks = _tcg_blocks(s)   # after the timed part: the query costs QEMU time
            if n_blocks is not None:
                blocks.append(n_blocks)
            t1 = time.monotonic()
            s.exec("/bin/true")
            warm_exec.append(time.monotonic() - t1)
            s.stop()
            Sandbox.remove(s.name)

            t0 = time.monotonic()
            f = base.fork(name=f"fork{r}")
            f.exec("/bin/true")
            fork.append(time.monotonic() - t0)
            f.stop()
            Sandbox.remove(f.name)

            pool.wait_ready(timeout=300)
            t0 = time.monotonic()
            p = pool.acquire()
            p.exec("/bin/true")
            pool_t.append(time.monotonic() - t0)
            pool.release(p)
        pool.close()
        # memory per extra fork: summed PSS of every sandbox's processes, 1 vs 4 forks
        forks = [base.fork(name=f"mem{k}") for k in range(3)]
        time.sleep(3)
        pids = [i.pid for i in Sandbox.list() if i.pid]
        total = _tree_pss_mib(pids)
        one = _tree_pss_mib([i.pid for i in Sandbox.list() if i.pid and i.name == "mem0"])
        for f in forks:
            f.stop()
            Sandbox.remove(f.name)
    finally:
        import shutil

        pool.close()
        base.stop()
        Sandbox.remove("base")
        shutil.rmtree(home, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in
           (("cold_s", cold), ("restore_s", restore), ("fork_s", fork),
            ("pool_acquire_s", pool_t))}
    return {
        **{k: round(v, 4) for k, v in med.items()},
        "restore_vs_cold_ratio": round(med["cold_s"] / med["restore_s"], 2),
        "fork_vs_cold_ratio": round(med["cold_s"] / med["fork_s"], 2),
        "pool_vs_cold_ratio": round(med["cold_s"] / med["pool_acquire_s"], 2),
        "fork_pss_mib": round(one, 1),
        "all_sandboxes_pss_mib": round(total, 1),
        "rounds": rounds,
        "restore_tcg_blocks": int(statistics.median(blocks)) if blocks else None,
        "restore_first_exec_s": round(statistics.median(first_exec), 4),
        "restore_warm_exec_s": round(statistics.median(warm_exec), 4),
        # where the median restore's time went: seconds since the call at each supervisor
        # step (snapshots.restore_phases), then the first exec's own time
        "restore_phases_s": sorted(phases, key=lambda p: p.get("reported", 0.0))[
            len(phases) // 2] if phases else {},
    }


def main() -> None:
    """``python -m benchmarks.snapshot [--quick]``: the last line printed is the JSON result."""
    quick_main(__doc__, run, "3 rounds")

if __name__ == "__main__":
    main()
