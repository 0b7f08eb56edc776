"""rootfs benchmark: cold pull + unpack vs skopeo + umoci, warm prepare, image-disk build.

Same run, same local registry (Debian's docker-registry on 127.0.0.1, plain
HTTP) and the same ~30 MB four-layer image:

* ``cold_ratio`` = (skopeo copy + umoci unpack) / (our pull + unpack)
* ``prepare_target_ratio`` = 100 ms / our warm ``prepare`` with 10 patches
* ``prepare_vs_flat_ratio`` = (copy the whole tree + patch + mkfs.ext4 -d) / our prepare
* ``erofs_vs_ext4_ratio`` = mkfs.ext4 -d / mkfs.erofs build time of the image disk

    python -m benchmarks.rootfs [--quick]     # last line: one JSON object
    python -m pytest benchmarks/rootfs.py     # pytest-benchmark
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import rootfs
from benchmarks._common import quick_main
from benchmarks._rootfs_image import bench_layers
from rootfs import Patch
from rootfs._disks import build_ext4, ext4_size_for
from tests.rootfs._registry import Registry, policy_file

REPO = "bench/app"


def patches(work: Path) -> list[Patch]:
    """Ten patches of every kind (the warm-prepare workload)."""
    src = work / "patch-src"
    if not src.exists():
        (src / "dir").mkdir(parents=True)
        (src / "dir" / "a.txt").write_text("a")
        (src / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    return [
        Patch.text("/etc/app.conf", "key = value\n", mode=0o600),
        Patch.file("/usr/local/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
        Patch.append("/etc/hosts", "203.0.113.7 db\n"),
        Patch.copy_file(src / "cert.pem", "/etc/ssl/app.pem"),
        Patch.copy_dir(src / "dir", "/opt/app"),
        Patch.symlink("/etc/app.conf", "/etc/app.link"),
        Patch.mkdir("/var/lib/app", mode=0o700),
        Patch.remove("/etc/motd"),
        Patch.remove("/usr/share/pkg1"),
        Patch.text("/lib/through-symlink.conf", "x\n"),
    ]


class Setup:
    """Registry + pushed image; cleaned up by ``close``."""

    def __init__(self, work: Path, scale: float) -> None:
        self.work = work
        self.registry = Registry(work / "registry").start()
        src = rootfs.ImageStore(work / "src-store")
        img = rootfs.image_from_layers(src, "local/bench:1", bench_layers(scale),
                                       config={"Cmd": ["/bin/sh"]})
        self.image = img
        self.uncompressed = sum(len(x) for x in bench_layers(scale)) if scale < 0 else 0
        self.compressed = sum(ly.size for ly in img.layers)
        rootfs.write_oci_layout(src, work / "layout", {"v1": img})
        self.ref = self.registry.push(work / "layout", "v1", REPO)
        self.policy = policy_file(work)
        self.n = 0

    def fresh(self, name: str) -> Path:
        self.n += 1
        p = self.work / f"{name}-{self.n}"
        return p

    def ours_cold(self) -> tuple[float, float]:
        store = rootfs.ImageStore(self.fresh("store"))
        dest = self.fresh("root")
        t0 = time.perf_counter()
        img = store.pull(self.ref, insecure=True)
        t1 = time.perf_counter()
        store.unpack(img, dest)
        t2 = time.perf_counter()
        shutil.rmtree(store.home)
        shutil.rmtree(dest)
        return t1 - t0, t2 - t1

    def baseline_cold(self) -> tuple[float, float]:
        oci = self.fresh("oci")
        bundle = self.fresh("bundle")
        t0 = time.perf_counter()
        subprocess.run(["skopeo", "--policy", str(self.policy), "copy", "-q",
                        "--src-tls-verify=false", f"docker://{self.ref}", f"oci:{oci}:x"],
                       check=True, capture_output=True)
        t1 = time.perf_counter()
        subprocess.run(["umoci", "unpack", "--image", f"{oci}:x", str(bundle)],
                       check=True, capture_output=True)
        t2 = time.perf_counter()
        shutil.rmtree(oci)
        shutil.rmtree(bundle)
        return t1 - t0, t2 - t1

    def close(self) -> None:
        self.registry.stop()


def prepare_bench(setup: Setup, rounds: int) -> dict[str, float]:
    store = rootfs.ImageStore(setup.work / "prep-store")
    img = store.pull(setup.ref, insecure=True)
    tree = store.rootfs_dir(img)
    t = time.perf_counter()
    store.image_disk(img, "erofs")
    erofs_s = time.perf_counter() - t
    t = time.perf_counter()
    store.image_disk(img, "ext4")
    ext4_s = time.perf_counter() - t
    ps = patches(setup.work)
    store.prepare(img, patches=ps).remove()  # warm caches
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        root = store.prepare(img, patches=ps)
        times.append(time.perf_counter() - t)
        root.remove()
    flat = []
    for _ in range(max(2, rounds // 4)):
        d = setup.fresh("flat")
        t = time.perf_counter()
        shutil.copytree(tree, d / "root", symlinks=True)
        rootfs.apply_patches(ps, upper=d / "root")
        build_ext4(d / "root", d / "flat.ext4", ext4_size_for(d / "root") + 256)
        flat.append(time.perf_counter() - t)
        shutil.rmtree(d)
    return {
        "erofs_build_s": erofs_s,
        "ext4_build_s": ext4_s,
        "prepare_warm_ms": statistics.median(times) * 1000,
        "flat_prepare_ms": statistics.median(flat) * 1000,
    }


def run(quick: bool) -> dict[str, Any]:
    rounds = 2 if quick else 5
    prep_rounds = 8 if quick else 30
    with tempfile.TemporaryDirectory(prefix="bench-rootfs-", dir="/var/tmp") as tmp:
        setup = Setup(Path(tmp), 1.0)
        try:
            res: dict[str, Any] = {"rounds": rounds, "layers": len(setup.image.layers),
                                   "compressed_mb": round(setup.compressed / 1e6, 1)}
            ours = [setup.ours_cold() for _ in range(rounds)]
            base = [setup.baseline_cold() for _ in range(rounds)]
            res["ours_pull_s"] = statistics.median(o[0] for o in ours)
            res["ours_unpack_s"] = statistics.median(o[1] for o in ours)
            res["ours_cold_s"] = statistics.median(o[0] + o[1] for o in ours)
            res["skopeo_copy_s"] = statistics.median(b[0] for b in base)
            res["umoci_unpack_s"] = statistics.median(b[1] for b in base)
            res["baseline_cold_s"] = statistics.median(b[0] + b[1] for b in base)
            res["cold_ratio"] = res["baseline_cold_s"] / res["ours_cold_s"]
            res["pull_ratio"] = res["skopeo_copy_s"] / res["ours_pull_s"]
            res["unpack_ratio"] = res["umoci_unpack_s"] / res["ours_unpack_s"]
            res.update(prepare_bench(setup, prep_rounds))
            res["prepare_target_ratio"] = 100.0 / res["prepare_warm_ms"]
            res["prepare_vs_flat_ratio"] = res["flat_prepare_ms"] / res["prepare_warm_ms"]
            res["erofs_vs_ext4_ratio"] = res["ext4_build_s"] / res["erofs_build_s"]
        finally:
            setup.close()
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}


@pytest.fixture(scope="module")
def bench_setup() -> Iterator[Setup]:
    with tempfile.TemporaryDirectory(prefix="bench-rootfs-", dir="/var/tmp") as tmp:
        s = Setup(Path(tmp), 0.5)
        try:
            yield s
        finally:
            s.close()


def test_cold_pull_unpack(benchmark: Any, bench_setup: Setup) -> None:
    benchmark.pedantic(bench_setup.ours_cold, rounds=3, iterations=1)


def test_skopeo_umoci_baseline(benchmark: Any, bench_setup: Setup) -> None:
    benchmark.pedantic(bench_setup.baseline_cold, rounds=3, iterations=1)


def test_warm_prepare_10_patches(benchmark: Any, bench_setup: Setup) -> None:
    store = rootfs.ImageStore(bench_setup.work / "pb-store")
    img = store.pull(bench_setup.ref, insecure=True)
    ps = patches(bench_setup.work)
    store.prepare(img, patches=ps).remove()
    benchmark.pedantic(lambda: store.prepare(img, patches=ps).remove(), rounds=10, iterations=1)


def main() -> None:
    quick_main(__doc__, run, "fewer rounds (under a minute)")


if __name__ == "__main__":
    main()
