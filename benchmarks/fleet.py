"""Fleet benchmark: ``RaySandboxPool.map`` on a local Ray cluster of one vs two nodes, and
Ray's per-item dispatch cost against a local ``microvm.Pool``.

Same run, same busybox image, 256 MiB guests, network ``none``; the nodes are started
with ``microvm fleet node`` on this machine (1 CPU each for Ray's own tasks, their own
``$MICROVM_HOME``; sandbox actors take no CPU), so a second node adds no cores: on a
2-core host ``two_node_vs_one_ratio`` measures the overhead of spreading, not a speed-up.

* ``one_node_map_s`` / ``two_node_map_s``: ``map`` of 40 short commands (``echo $1``)
  over a pool of 4 on one node (4 slots), then on two nodes (2 + 2), warm pools;
  ``two_node_vs_one_ratio`` = one / two (reported);
* ``ray_item_s`` / ``local_item_s``: makespan of items that take 1 s (``sleep 1``), 4 per
  sandbox, through ``RaySandboxPool.map`` vs 4 threads over a local ``microvm.Pool`` of
  4 (acquire, ``shell``); ``ray_vs_local_item_ratio`` = local / ray (target >= 0.8);
  ``ray_dispatch_ms_per_item`` = (ray - local) / items.

    python -m benchmarks.fleet [--quick]     # last line: one JSON object
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import rootfs
from benchmarks._common import quick_main
from tests.microvm.sandbox_fixtures import busybox_image
from tests.support import kill_process_tree

MEMORY_MIB = 256
IMAGE = "local/fleetbench:1"
REPO = Path(__file__).resolve().parents[1]


def _image(home: Path) -> None:
    busybox_image(rootfs.ImageStore(home / "images"), IMAGE)


def _node(home: Path, *args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "microvm", "fleet", "node", "--no-network",
                        "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                        "--object-store-memory", "80000000", "--home", str(home), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        raise RuntimeError(f"microvm fleet node failed: {r.stderr.strip()[-500:]}")


def _timed_map(pool: Any, cmd: str, n: int) -> float:
    t0 = time.monotonic()
    results = list(pool.map(cmd, range(n)))
    took = time.monotonic() - t0
    bad = [r for r in results if not r.ok or r.value.exit_code != 0]
    if len(results) != n or bad:
        raise RuntimeError(f"map failed: {len(results)} results, bad: {bad[:2]}")
    return took


def _local_items(n: int, home: Path) -> float:
    """``n`` one-second items over a local ``microvm.Pool`` of 4 (4 worker threads)."""
    from microvm import Pool

    os.environ["MICROVM_HOME"] = str(home)
    pool = Pool(IMAGE, size=4, name="fbl", memory=MEMORY_MIB, network="none")
    try:
        pool.wait_ready(timeout=600)
        sandboxes = [pool.acquire() for _ in range(4)]
        for sb in sandboxes:
            sb.exec("/bin/true")
        todo: queue.Queue[int] = queue.Queue()
        for i in range(n):
            todo.put(i)
        errors: list[str] = []

        def worker(sb: Any) -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                out = sb.shell(f"sleep 1; echo {i}")
                if out.exit_code != 0:
                    errors.append(out.stderr_text)

        threads = [threading.Thread(target=worker, args=(sb,)) for sb in sandboxes]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        if errors:
            raise RuntimeError(f"local items failed: {errors[:2]}")
        for sb in sandboxes:
            pool.release(sb)
        return took
    finally:
        pool.close()


def run(quick: bool) -> dict[str, Any]:
    """One vs two nodes, then Ray vs local at 1 s items; returns the result keys."""
    import ray

    from microvm.fleet import RaySandboxPool

    base = Path(tempfile.mkdtemp(prefix="fleetbench-"))
    homes = {"head": base / "home-head", "second": base / "home-second"}
    for h in homes.values():
        _image(h)
    temp_dir = Path(tempfile.mkdtemp(prefix="mvrayb", dir="/tmp"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    n_short = 40
    n_long = 16 if not quick else 8
    opts: dict[str, Any] = dict(network="none", memory=MEMORY_MIB, pull_policy="never",
                                item_timeout=120)
    try:
        _node(homes["head"], "--slots", "4", "--port", str(port), "--temp-dir", str(temp_dir))
        ray.init(address=f"127.0.0.1:{port}", _node_ip_address="127.0.0.1",
                 logging_level="WARNING", log_to_driver=False)
        with RaySandboxPool(IMAGE, 4, name="fb1", **opts) as pool:
            _timed_map(pool, "echo $1", 8)                       # warm
            one = min(_timed_map(pool, "echo $1", n_short) for _ in range(1 if quick else 3))
            ray_long = _timed_map(pool, "sleep 1; echo $1", n_long)
        local_long = _local_items(n_long, homes["head"])
        _node(homes["second"], "--slots", "4", "--address", f"127.0.0.1:{port}")
        with RaySandboxPool(IMAGE, 4, name="fb2", per_node=2, **opts) as pool:
            spread = sorted(pool.nodes().values())
            if spread != [2, 2]:
                raise RuntimeError(f"the two-node pool is not spread 2+2: {pool.nodes()}")
            _timed_map(pool, "echo $1", 8)
            two = min(_timed_map(pool, "echo $1", n_short) for _ in range(1 if quick else 3))
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        kill_process_tree(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    return {
        "one_node_map_s": round(one, 3),
        "two_node_map_s": round(two, 3),
        "two_node_vs_one_ratio": round(one / two, 3),
        "short_items": n_short,
        "ray_item_s": round(ray_long, 3),
        "local_item_s": round(local_long, 3),
        "ray_vs_local_item_ratio": round(local_long / ray_long, 3),
        "ray_dispatch_ms_per_item": round((ray_long - local_long) / n_long * 1000, 1),
        "long_items": n_long,
        "pool_size": 4,
        "quick": quick,
    }


def main() -> None:
    """``python -m benchmarks.fleet [--quick]``: the last line printed is the JSON result."""
    quick_main(__doc__, run, "one timed map per setting, 8 long items")

if __name__ == "__main__":
    main()
