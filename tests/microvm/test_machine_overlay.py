"""The design's boot data path: a tiny boot disk with only the agent (/dev/vda), the image as a
read-only erofs lower (/dev/vdb) and a writable ext4 upper (/dev/vdc), mounted as an overlay root."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from microvm import Machine
from microvm.agent import agent_binary
from microvm.backends import Disk
from microvm.guestdisk import build_ext4
from microvm.kernel import Kernel
from tests.support import require_binaries

pytestmark = [pytest.mark.vm, pytest.mark.timeout(120)]


def test_overlay_root_from_erofs_and_ext4(
    kernel: Kernel, busybox_root: Path, tmp_path: Path
) -> None:
    require_binaries("qemu-system-x86_64", "mkfs.erofs", "mkfs.ext4", "debugfs")
    (tmp_path / "empty").mkdir()
    boot = build_ext4(tmp_path / "empty", tmp_path / "boot.img", agent=agent_binary(), free_mib=8)
    lower = tmp_path / "image.erofs"
    subprocess.run(
        ["mkfs.erofs", "--quiet", "--all-root", str(lower), str(busybox_root)],
        check=True,
        capture_output=True,
    )
    upper_src = tmp_path / "upper-src"
    (upper_src / "upper" / "etc").mkdir(parents=True)
    (upper_src / "work").mkdir()
    (upper_src / "upper" / "etc" / "patched").write_text("baked in\n")
    upper = build_ext4(upper_src, tmp_path / "upper.img", free_mib=16)
    root_plan = {
        "kind": "overlay",
        "lower": [{"device": "/dev/vdb", "fstype": "erofs"}],
        "upper": {"device": "/dev/vdc", "fstype": "ext4", "upperdir": "/upper", "workdir": "/work"},
    }
    m = Machine("qemu", kernel=kernel, memory=384, bootstrap={"root": root_plan},
                disks=[Disk(boot), Disk(lower, readonly=True), Disk(upper)])  # fmt: skip
    m.start()
    try:
        r = m.agent.exec(
            "/bin/sh", ["-c", "cat /etc/patched; echo new > /etc/written; grep ' / ' /proc/mounts"]
        )
        assert r.exit_code == 0, r.stderr
        assert r.stdout.startswith(b"baked in\n") and b"overlay" in r.stdout
    finally:
        assert m.shutdown() == 0
    # the write landed in the upper disk, not in the read-only image
    out = subprocess.run(
        ["debugfs", "-R", "cat /upper/etc/written", str(upper)], capture_output=True
    )
    assert out.stdout == b"new\n"
