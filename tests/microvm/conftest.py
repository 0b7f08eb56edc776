"""Fixtures for microvm tests: the kernel, static test inits, busybox rootfs, the libkrun double."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from microvm.errors import KernelError
from microvm.kernel import Kernel, fetch_kernel, find_kernel

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def kernel() -> Kernel:
    """The guest kernel (vendor/ or $MICROVM_HOME/kernel; fetched once if missing)."""
    k = find_kernel()
    if k is None:
        try:
            k = fetch_kernel()
        except KernelError as e:
            pytest.skip(f"guest kernel unavailable (run ./setup.sh): {e}")
    return k


def _cc() -> list[str]:
    if shutil.which("musl-gcc"):
        return ["musl-gcc", "-static", "-Os"]
    if shutil.which("gcc"):
        return ["gcc", "-static", "-Os"]
    pytest.skip("needs musl-gcc or gcc (install musl-tools / build-essential)")


@pytest.fixture(scope="session")
def guest_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/microvm/guest_init.c compiled static."""
    out = tmp_path_factory.mktemp("init") / "guest-init"
    subprocess.run([*_cc(), "-o", str(out), str(HERE / "guest_init.c")], check=True)
    return out


@pytest.fixture(scope="session")
def init_disk(tmp_path_factory: pytest.TempPathFactory, guest_init: Path) -> Path:
    """An ext4 root with guest_init as /.microvm/agent (mount points included)."""
    from microvm import build_ext4

    root = tmp_path_factory.mktemp("initroot")
    (root / "mnt").mkdir()
    return build_ext4(
        root, tmp_path_factory.mktemp("img") / "init.img", agent=guest_init, free_mib=4
    )


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with Debian's busybox-static and its applet links under /bin."""
    bb = shutil.which("busybox")
    if bb is None:
        pytest.skip("needs busybox (Debian busybox-static)")
    root = tmp_path_factory.mktemp("bbroot")
    for d in ("bin", "etc", "tmp", "root", "mnt", "home"):
        (root / d).mkdir()
    shutil.copy2(bb, root / "bin" / "busybox")
    applets = subprocess.run(
        [bb, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for a in applets:
        if a != "busybox" and not (root / "bin" / a).exists():
            os.symlink("busybox", root / "bin" / a)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return root


def build_krun_double(out_dir: Path, *defines: str) -> Path:
    """Compile tests/microvm/krun_double.c into out_dir/libkrun.so.1."""
    if not shutil.which("gcc"):
        pytest.skip("needs gcc (build-essential)")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "libkrun.so.1"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-shared", "-fPIC", *[f"-D{d}" for d in defines],
         "-o", str(out), str(HERE / "krun_double.c")],
        check=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def krun_double(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The libkrun test double (full symbol set)."""
    return build_krun_double(tmp_path_factory.mktemp("krun"))


@pytest.fixture(scope="session")
def krun_double_noblk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The libkrun test double built without the block-device symbols (like a default libkrun build)."""
    return build_krun_double(tmp_path_factory.mktemp("krun-noblk"), "NO_BLK")
