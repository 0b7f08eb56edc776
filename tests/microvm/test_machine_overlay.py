"""The design's boot data path: a rootfs-style mount plan naming disk paths (an erofs image as the
read-only lower, an ext4 upper) is mapped to /dev/vdb, /dev/vdc behind a cached agent-only boot disk
(/dev/vda), and the agent mounts the overlay root."""

from __future__ import annotations

import gc
import subprocess
from pathlib import Path

import pytest

from microvm import Machine, build_ext4
from microvm._machine import ROOT_SHARE_TAG, map_root_plan
from microvm.errors import MicrovmError
from microvm.kernel import Kernel
from tests.support import require_binaries

pytestmark = [pytest.mark.vm, pytest.mark.timeout(120)]


def test_map_root_plan() -> None:
    plan = {
        "kind": "overlay",
        "lower": [
            {"disk": "/i/a.erofs", "fstype": "erofs"},
            {"disk": "/i/b.erofs", "fstype": "erofs"},
        ],
        "upper": {"disk": "/s/up.ext4", "fstype": "ext4", "upperdir": "/upper", "workdir": "/work"},
    }
    disks, mapped = map_root_plan(plan, 1)
    assert [(str(d.path), d.readonly) for d in disks] == [
        ("/i/a.erofs", True), ("/i/b.erofs", True), ("/s/up.ext4", False),
    ]  # fmt: skip
    assert mapped == {
        "kind": "overlay",
        "lower": [
            {"device": "/dev/vdb", "fstype": "erofs"},
            {"device": "/dev/vdc", "fstype": "erofs"},
        ],
        "upper": {"device": "/dev/vdd", "fstype": "ext4", "upperdir": "/upper", "workdir": "/work"},
    }
    disks, mapped = map_root_plan(
        {"kind": "disk", "root": {"disk": "/r.ext4", "fstype": "ext4"}}, 2
    )
    assert (
        mapped == {"kind": "disk", "device": "/dev/vdc", "fstype": "ext4"} and not disks[0].readonly
    )
    disks, mapped = map_root_plan({"kind": "bind", "dir": "/srv"}, 1)
    assert disks == [] and mapped == {"kind": "virtiofs", "tag": ROOT_SHARE_TAG,
                                      "readonly": False}
    with pytest.raises(MicrovmError, match="'tmpfs' is not supported"):
        map_root_plan({"kind": "tmpfs"}, 1)
    with pytest.raises(MicrovmError, match="needs a 'dir' path"):
        map_root_plan({"kind": "bind"}, 1)
    with pytest.raises(MicrovmError, match="needs a 'disk' path"):
        map_root_plan({"kind": "overlay", "lower": [{"device": "/dev/vdb"}], "upper": {}}, 1)
    with pytest.raises(MicrovmError, match="more than 8"):
        map_root_plan({"kind": "overlay", "lower": [{"disk": "x"}] * 8, "upper": {"disk": "u"}}, 1)


def test_bad_plan_leaves_no_rundir(kernel: Kernel, tmp_path: Path, monkeypatch) -> None:
    import tempfile

    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    img = tmp_path / "r.img"
    img.write_bytes(b"")
    with pytest.raises(MicrovmError, match="'tmpfs'"):
        Machine("qemu", kernel=kernel, disks=[img], root={"kind": "tmpfs"})
    gc.collect()
    assert list((tmp_path / "t").iterdir()) == []


def test_overlay_root_from_erofs_and_ext4(
    kernel: Kernel, busybox_root: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("MICROVM_HOME", str(tmp_path / "home"))  # the boot-disk cache
    require_binaries("qemu-system-x86_64", "mkfs.erofs", "mkfs.ext4", "debugfs")
    lower = tmp_path / "image.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "--all-root", str(lower), str(busybox_root)],
                   check=True, capture_output=True)  # fmt: skip
    upper_src = tmp_path / "upper-src"
    (upper_src / "upper" / "etc").mkdir(parents=True)
    (upper_src / "work").mkdir()
    (upper_src / "upper" / "etc" / "patched").write_text("baked in\n")
    upper = build_ext4(upper_src, tmp_path / "upper.img", free_mib=16)
    plan = {  # what rootfs.PreparedRoot.mount_plan() returns
        "kind": "overlay",
        "lower": [{"disk": str(lower), "fstype": "erofs"}],
        "upper": {"disk": str(upper), "fstype": "ext4", "upperdir": "/upper", "workdir": "/work"},
    }
    m = Machine("qemu", kernel=kernel, memory=384, root=plan)
    assert [d.readonly for d in m.spec.disks] == [False, True, False]
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
