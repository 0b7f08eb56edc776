"""Sandbox benchmark: ``Sandbox.create`` + first exec with the whole stack vs ``Machine``
alone vs the bare kernel boot; the guest's TCP throughput; the host memory of an idle
sandbox.

Measured in one run against one cached image (busybox + iperf3, built before timing),
the three start paths interleaved so background load hits them alike:

* ``sandbox_first_exec_s``: ``Sandbox.create`` (network ``public_only`` through the
  gateway and TAP uplink, the TLS proxy with one secret, 5 patches) + the first
  ``exec("/bin/true")`` result, median;
* ``machine_first_exec_s``: ``ImageStore.prepare`` of the same image with the same
  patches + ``Machine(root=prepared.mount_plan())`` + the first ``agent.exec``, median;
* ``bare_boot_s``: benchmarks/boot.py's floor (a static init that prints and reboots);
* ``sandbox_vs_machine_ratio`` = machine / sandbox (target >= 0.87),
  ``sandbox_vs_bare_ratio`` = bare / sandbox;
* ``guest_tcp_gbit_s``: iperf3 from the guest to ``iperf3 -s`` in an upstream namespace
  (TEST-NET address) through the gateway, the uplink and the host (root only);
* ``idle_host_pss_mib``: summed PSS of every process of one idle sandbox with a 256 MiB
  guest (the supervisor, which runs the gateway and proxy, QEMU, virtiofsd if any) after
  it settled; per process in ``pss_mib_by_process``, QEMU's by use (guest RAM, TCG
  cache, kernel image, other) in ``qemu_pss_mib_by_use`` (target <= 128 MiB). File pages
  (the kernel image, QEMU's binary) are shared by every QEMU on the host, so PSS is lower
  while other VMs run.

    python -m benchmarks.sandbox [--quick]     # needs root; last line: one JSON object
    python -m pytest benchmarks/sandbox.py     # pytest-benchmark
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import rootfs
from benchmarks._common import quick_main
from benchmarks._microvm_bare import bare_boot_once, build_bare_disk
from benchmarks._sandbox_rig import (
    UPSTREAM_IP,
    Upstream,
    build_bench_image,
    descendants,
    process_label,
    pss_by_process,
    qemu_pss_detail,
)
from microvm.kernel import Kernel, ensure_kernel

MEMORY_MIB = 256
N_PATCHES = 5
SECRETS = [{"env": "API_TOKEN", "value": "bench-secret-value", "host": "api.example.com"}]


def bench_patches() -> list[rootfs.Patch]:
    """The five patches every start applies (files, a directory, an append)."""
    return [
        rootfs.Patch.text("/etc/motd", "benchmark sandbox\n"),
        rootfs.Patch.text("/etc/app/config.json", '{"mode": "bench"}\n'),
        rootfs.Patch.mkdir("/var/lib/app"),
        rootfs.Patch.text("/root/.profile", "export PS1='$ '\n", mode=0o600),
        rootfs.Patch.append("/etc/passwd", "app:x:1000:1000:app:/home/app:/bin/sh\n"),
    ]


class Rig:
    """A private ``$MICROVM_HOME`` with the cached image, the bare disk and the kernel."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.kernel: Kernel = ensure_kernel()
        self.store = rootfs.ImageStore()
        self.image, self.iperf3 = build_bench_image(work, self.store)
        self.patches = bench_patches()
        self.bare_disk = build_bare_disk(work)
        self._n = 0

    def name(self) -> str:
        """A fresh sandbox name per start (no start waits on a same-name teardown)."""
        self._n += 1
        return f"bench{os.getpid() % 100000}-{self._n}"

    # -- the three start paths ---------------------------------------------------------
    def sandbox_first_exec(self, settle: float = 0.0
                           ) -> tuple[float, dict[str, dict[str, float]]]:
        """Seconds from ``Sandbox.create`` to the first exec result; with ``settle`` > 0,
        also the PSS per process (``by_process``) and of QEMU by use (``qemu``) after the
        sandbox idled that long (else ``{}``)."""
        from microvm import Sandbox

        t0 = time.perf_counter()
        with Sandbox.create(self.name(), image=self.image, patches=self.patches,
                            memory=MEMORY_MIB, secrets=SECRETS, network="public_only") as sb:
            r = sb.exec("/bin/true")
            dt = time.perf_counter() - t0
            if r.exit_code != 0:
                raise RuntimeError(f"/bin/true exited {r.exit_code} in the sandbox")
            pss: dict[str, dict[str, float]] = {}
            if settle > 0:
                time.sleep(settle)
                pid = sb.info().pid
                if pid is None:
                    raise RuntimeError("the sandbox has no supervisor pid")
                pss["by_process"] = pss_by_process(pid)
                for p in descendants(pid):
                    if process_label(p, pid) == "qemu":
                        pss["qemu"] = qemu_pss_detail(p)
        return dt, pss

    def machine_first_exec(self) -> float:
        """Seconds from ``ImageStore.prepare`` (same patches) + ``Machine`` start to the
        first exec result (same disks as the sandbox, no network)."""
        from microvm import Machine

        dest = self.work / "machine-root"
        t0 = time.perf_counter()
        prepared = self.store.prepare(self.image, patches=self.patches, dest=dest)
        try:
            with Machine("qemu", kernel=self.kernel, root=prepared.mount_plan(),
                         memory=MEMORY_MIB) as m:
                r = m.agent.exec("/bin/true", [])
                dt = time.perf_counter() - t0
                if r.exit_code != 0:
                    raise RuntimeError(f"/bin/true exited {r.exit_code} in the machine")
        finally:
            prepared.remove()
            shutil.rmtree(dest, ignore_errors=True)
        return dt

    def bare_boot(self) -> float:
        """Seconds to the bare init's console line (benchmarks/boot.py's floor)."""
        return bare_boot_once(self.kernel, self.bare_disk, MEMORY_MIB)[0]

    # -- network ----------------------------------------------------------------------
    def guest_tcp_gbit_s(self, seconds: int) -> float:
        """iperf3 from a sandbox (full stack) to the upstream namespace, Gbit/s received."""
        from microvm import Sandbox

        if self.iperf3 is None:
            raise RuntimeError("iperf3 is not installed on the host (Debian: iperf3)")
        up = Upstream()
        try:
            with Sandbox.create(self.name(), image=self.image, patches=self.patches,
                                memory=MEMORY_MIB, secrets=SECRETS,
                                network="public_only") as sb:
                r = sb.exec(self.iperf3, ["-c", UPSTREAM_IP, "-t", str(seconds), "-J"],
                            timeout=seconds + 60)
                out = json.loads(r.stdout)
                if "error" in out:
                    raise RuntimeError(f"iperf3 in the guest: {out['error']}")
                return float(out["end"]["sum_received"]["bits_per_second"]) / 1e9
        finally:
            up.close()


@contextlib.contextmanager
def rig() -> Iterator[Rig]:
    """A :class:`Rig` in a private ``$MICROVM_HOME`` (removed afterwards, with the old
    value restored)."""
    old = os.environ.get("MICROVM_HOME")
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        os.environ["MICROVM_HOME"] = str(Path(tmp) / "home")
        try:
            yield Rig(Path(tmp))
        finally:
            if old is None:
                os.environ.pop("MICROVM_HOME", None)
            else:
                os.environ["MICROVM_HOME"] = old


def run(quick: bool) -> dict[str, Any]:
    """Measure everything; returns the JSON-able result."""
    rounds = 3 if quick else 7
    settle = 5.0 if quick else 10.0
    res: dict[str, Any] = {"rounds": rounds, "memory_mib": MEMORY_MIB, "patches": N_PATCHES,
                           "secrets": len(SECRETS), "network": "public_only"}
    with rig() as r:
        sandbox, machine, bare = [], [], []
        pss: dict[str, dict[str, float]] = {}
        for i in range(rounds):
            # rotate the order so a burst of background load does not always hit one path
            order = ["bare", "machine", "sandbox"]
            order = order[i % 3:] + order[:i % 3]
            for what in order:
                if what == "bare":
                    bare.append(r.bare_boot())
                elif what == "machine":
                    machine.append(r.machine_first_exec())
                else:
                    last = i == rounds - 1
                    dt, p = r.sandbox_first_exec(settle=settle if last else 0.0)
                    sandbox.append(dt)
                    pss = p or pss
        res["sandbox_first_exec_s"] = statistics.median(sandbox)
        res["machine_first_exec_s"] = statistics.median(machine)
        res["bare_boot_s"] = statistics.median(bare)
        res["sandbox_first_exec_all_s"] = [round(x, 3) for x in sandbox]
        res["machine_first_exec_all_s"] = [round(x, 3) for x in machine]
        res["bare_boot_all_s"] = [round(x, 3) for x in bare]
        res["sandbox_vs_machine_ratio"] = res["machine_first_exec_s"] / res["sandbox_first_exec_s"]
        res["sandbox_vs_bare_ratio"] = res["bare_boot_s"] / res["sandbox_first_exec_s"]
        res["idle_settle_s"] = settle
        res["pss_mib_by_process"] = pss.get("by_process", {})
        res["qemu_pss_mib_by_use"] = pss.get("qemu", {})
        res["idle_host_pss_mib"] = round(sum(res["pss_mib_by_process"].values()), 1)
        try:
            res["guest_tcp_gbit_s"] = r.guest_tcp_gbit_s(3 if quick else 10)
        except Exception as e:  # no root / no iperf3: report the rest
            res["guest_tcp_error"] = f"{type(e).__name__}: {e}"
    return res


def test_sandbox_first_exec(benchmark: Any) -> None:
    with rig() as r:
        benchmark.pedantic(lambda: r.sandbox_first_exec(), rounds=3, iterations=1)


def test_machine_first_exec(benchmark: Any) -> None:
    with rig() as r:
        benchmark.pedantic(r.machine_first_exec, rounds=3, iterations=1)


def main() -> None:
    """``python -m benchmarks.sandbox [--quick]``: the last line printed is the JSON result."""
    quick_main(__doc__, run, "3 rounds (about a minute)")


if __name__ == "__main__":
    main()
