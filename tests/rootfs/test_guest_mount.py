"""The real guest kernel (libkrunfw under QEMU TCG) mounts a prepared root from its mount plan.

The boot disk holds busybox-static and a shell /init that does what the guest agent
will do with ``mount_plan()``: erofs lower (read-only) + ext4 upper -> overlayfs.
It prints the merged tree and writes a file, which must land in the upper disk.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import rootfs
from rootfs._disks import build_ext4
from tests.rootfs._layers import base_layers
from tests.rootfs.test_prepare import PATCHES
from tests.support import require_binaries, require_root

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "vendor" / "krunfw.elf"

INIT = """#!/bin/sh
mkdir -p /proc /sys /dev /lower /up /merged
mount -t proc proc /proc
mount -t devtmpfs dev /dev
UP=$(findfs LABEL=upper)
LOW=
for d in /dev/vd?; do
  if [ "$d" != /dev/vda ] && [ "$d" != "$UP" ]; then LOW=$d; fi
done
mount -t erofs -o ro "$LOW" /lower || echo MOUNT-FAILED lower
mount -t ext4 "$UP" /up || echo MOUNT-FAILED upper
mount -t overlay overlay -o lowerdir=/lower,upperdir=/up/upper,workdir=/up/work /merged \\
  || echo MOUNT-FAILED overlay
echo BEGIN-TREE
cd /merged && find . | sort | while read -r f; do stat -c '%n|%f|%u|%g|%s' "$f"; done
echo END-TREE
echo BEGIN-MOTD; cat /merged/etc/motd; echo END-MOTD
echo written-in-guest > /merged/guest.txt
cd /
umount /merged; umount /up; umount /lower
sync
echo GUEST-DONE
reboot -f
"""


def _host_tree(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            p = Path(dirpath) / n
            st = os.lstat(p)
            size = "" if stat.S_ISDIR(st.st_mode) else str(st.st_size)
            out.add(f"./{p.relative_to(root)}|{st.st_mode:x}|{st.st_uid}|{st.st_gid}|{size}")
    return out


def _guest_tree(lines: list[str]) -> set[str]:
    out = set()
    for line in lines:
        name, mode, uid, gid, size = line.split("|")
        if name == ".":
            continue
        if stat.S_ISDIR(int(mode, 16)):
            size = ""
        out.add(f"{name}|{mode}|{uid}|{gid}|{size}")
    return out


@pytest.mark.vm
@pytest.mark.slow
def test_guest_kernel_mounts_the_prepared_root(tmp_path: Path) -> None:
    require_root()
    require_binaries("qemu-system-x86_64", "/bin/busybox", "mkfs.erofs", "mkfs.ext4", "debugfs")
    if not KERNEL.exists():
        pytest.skip("guest kernel vendor/krunfw.elf missing (run ./setup.sh)")
    store = rootfs.ImageStore(tmp_path / "store")
    img = rootfs.image_from_layers(store, "local/layered:1", base_layers())
    prepared = store.prepare(img, patches=PATCHES, upper_size_mib=64)
    plan = prepared.mount_plan()
    expected = tmp_path / "expected"
    store.unpack(img, expected)
    rootfs.prepare_bind_root(expected, patches=PATCHES)

    boot = tmp_path / "boot"
    (boot / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", boot / "bin" / "busybox")
    for applet in ("sh", "mkdir", "mount", "umount", "findfs", "find", "sort", "stat", "cat",
                   "sync", "reboot", "echo"):
        os.symlink("busybox", boot / "bin" / applet)
    (boot / "init").write_text(INIT)
    os.chmod(boot / "init", 0o755)
    build_ext4(boot, tmp_path / "boot.ext4", 16, label="boot")

    console = tmp_path / "console.log"
    argv = [
        "qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "tcg", "-cpu", "max",
        "-m", "256M", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
        "-kernel", str(KERNEL),
        "-append", "console=hvc0 reboot=t panic=-1 root=/dev/vda rw rootwait init=/init quiet",
        "-global", "virtio-mmio.force-legacy=off",
        "-drive", f"id=d0,file={tmp_path / 'boot.ext4'},format=raw,if=none",
        "-device", "virtio-blk-device,drive=d0",
        "-drive", f"id=d1,file={plan['lower'][0]['disk']},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=d1",
        "-drive", f"id=d2,file={plan['upper']['disk']},format=raw,if=none",
        "-device", "virtio-blk-device,drive=d2",
        "-device", "virtio-serial-device", "-chardev", f"file,id=con,path={console}",
        "-device", "virtconsole,chardev=con",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"guest did not finish in 120 s: {console.read_text()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = console.read_text(errors="replace").replace("\r", "")
    assert "GUEST-DONE" in log, log[-3000:]
    assert "MOUNT-FAILED" not in log, log[-3000:]
    tree = log.split("BEGIN-TREE\n", 1)[1].split("END-TREE", 1)[0].strip().splitlines()
    assert _guest_tree(tree) == _host_tree(expected)
    assert log.split("BEGIN-MOTD\n", 1)[1].split("END-MOTD", 1)[0] == "patched motd\n"
    written = subprocess.run(["debugfs", "-R", "cat /upper/guest.txt", plan["upper"]["disk"]],
                             capture_output=True, text=True, check=True).stdout
    assert written == "written-in-guest\n"

