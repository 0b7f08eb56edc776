"""Prepared roots: image disk + upper disk, mounted on the host exactly as the guest will."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

import rootfs
from rootfs import Patch
from tests.rootfs._layers import base_layers
from tests.rootfs._mount import mount_plan
from tests.support import require_binaries, require_root


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found" or dirpath != str(root)]
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "-> " + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"dir {stat.S_IMODE(st.st_mode):o}"
            else:
                out[rel] = f"{stat.S_IMODE(st.st_mode):o} {p.read_bytes()!r}"
    return out


@pytest.fixture
def layered(store: rootfs.ImageStore) -> rootfs.Image:
    return rootfs.image_from_layers(store, "local/layered:1", base_layers())


def test_mount_plan_shape_and_json(store: rootfs.ImageStore, layered: rootfs.Image) -> None:
    require_binaries("mkfs.erofs", "mkfs.ext4")
    root = store.prepare(layered, upper_size_mib=64)
    plan = root.mount_plan()
    assert plan == {
        "kind": "overlay",
        "lower": [{"disk": str(root.image_disk), "fstype": "erofs"}],
        "upper": {"disk": str(root.upper_disk), "fstype": "ext4", "upperdir": "/upper",
                  "workdir": "/work"},
    }
    assert json.loads(json.dumps(plan)) == plan
    assert root.kind == "overlay" and root.image_format == "erofs" and root.upper_format == "ext4"
    assert root.bind_dir is None
    assert root.upper_disk is not None and root.upper_disk.stat().st_size == 64 << 20
    assert root.upper_disk.stat().st_blocks * 512 < 16 << 20  # sparse
    assert stat.S_IMODE(root.upper_disk.stat().st_mode) == 0o600  # patches may hold secrets
    assert root.sandbox_dir is not None
    assert stat.S_IMODE(root.sandbox_dir.stat().st_mode) == 0o700


def test_image_disk_is_cached_and_shared(store: rootfs.ImageStore, layered: rootfs.Image) -> None:
    require_binaries("mkfs.erofs", "mkfs.ext4")
    a = store.prepare(layered, upper_size_mib=32)
    mtime = a.image_disk.stat().st_mtime_ns if a.image_disk else 0
    b = store.prepare(layered, upper_size_mib=32)
    assert a.image_disk == b.image_disk and a.upper_disk != b.upper_disk
    assert b.image_disk is not None and b.image_disk.stat().st_mtime_ns == mtime
    a.remove()
    assert a.upper_disk is not None and not a.upper_disk.exists()
    assert b.image_disk.exists()


PATCHES = [
    Patch.text("/etc/app.conf", "key = value\n", mode=0o600),
    Patch.file("/usr/lib/blob.bin", b"\x00\x01\x02"),
    Patch.append("/etc/hosts", "203.0.113.7 db\n"),
    Patch.remove("/etc/added"),
    Patch.remove("/opt/app"),
    Patch.mkdir("/opt/app/fresh", mode=0o700),
    Patch.symlink("/etc/app.conf", "/etc/app.link"),
    Patch.text("/lib/through-symlink.so", "so"),
    Patch.text("/etc/motd", "patched motd\n", replace=True),
    Patch.remove("/bin/tool"),
]


def test_prepared_root_mounts_to_the_expected_tree(
    store: rootfs.ImageStore, layered: rootfs.Image, tmp_path: Path
) -> None:
    require_root()
    require_binaries("mkfs.erofs", "mkfs.ext4", "losetup", "mount")
    expected_dir = tmp_path / "expected"
    store.unpack(layered, expected_dir)
    rootfs.prepare_bind_root(expected_dir, patches=PATCHES)
    for fmt in ("erofs", "ext4"):
        root = store.prepare(layered, patches=PATCHES, upper_size_mib=64, image_format=fmt)
        with mount_plan(root.mount_plan(), tmp_path / f"mnt-{fmt}") as merged:
            got = _tree(merged)
            want = _tree(expected_dir)
            assert got == want
            assert stat.S_IMODE(os.stat(merged / "etc/hosts").st_mode) == 0o640
            assert os.stat(merged / "data/file").st_uid == 1000
            assert os.stat(merged / "data/hard").st_ino == os.stat(merged / "data/file").st_ino
            assert sorted(os.listdir(merged / "opt/app")) == ["fresh"]
            # the guest can write: the upper is a real ext4
            (merged / "tmpfile").write_text("guest write")


def test_busybox_image_mounts_and_runs(store: rootfs.ImageStore, busybox_image: rootfs.Image,
                                       tmp_path: Path) -> None:
    require_root()
    require_binaries("mkfs.erofs", "mkfs.ext4", "losetup", "mount", "chroot")
    root = store.prepare(busybox_image, patches=[Patch.text("/etc/motd", "hi\n", replace=True)],
                         upper_size_mib=32)
    with mount_plan(root.mount_plan(), tmp_path / "mnt") as merged:
        out = subprocess.run(["chroot", str(merged), "/bin/sh", "-c", "cat /etc/motd; ls /bin"],
                             capture_output=True, text=True, check=True).stdout
    assert out.startswith("hi\n") and "busybox" in out


@pytest.mark.parametrize("staging", ["auto", None])
def test_upper_disk_holds_upper_and_work(store: rootfs.ImageStore, layered: rootfs.Image,
                                         staging: str | None) -> None:
    require_root()
    require_binaries("mkfs.erofs", "mkfs.ext4", "debugfs")
    store = rootfs.ImageStore(store.home, staging_dir=staging)
    root = store.prepare(layered, patches=[Patch.remove("/etc/motd")], upper_size_mib=32)
    assert root.sandbox_dir is not None
    assert [p.name for p in root.sandbox_dir.iterdir()] in (["upper.ext4", "meta.json"],
                                                            ["meta.json", "upper.ext4"])
    listing = subprocess.run(["debugfs", "-R", "ls -l /", str(root.upper_disk)],
                             capture_output=True, text=True, check=True).stdout
    assert " upper" in listing and " work" in listing
    wh = subprocess.run(["debugfs", "-R", "stat /upper/etc/motd", str(root.upper_disk)],
                        capture_output=True, text=True, check=True).stdout
    assert "Type: character special" in wh and "Device major/minor number: 00:00" in wh


def test_prepare_validates_arguments(store: rootfs.ImageStore, layered: rootfs.Image) -> None:
    with pytest.raises(rootfs.DiskError, match="upper_size_mib=1"):
        store.prepare(layered, upper_size_mib=1)
    with pytest.raises(rootfs.DiskError, match="'squashfs' not supported"):
        store.prepare(layered, image_format="squashfs")  # type: ignore[arg-type]
    with pytest.raises(rootfs.PatchError, match="path exists in image layer: '/etc/hosts'"):
        store.prepare(layered, patches=[Patch.text("/etc/hosts", "x")])
    assert list((store.home / "prepared").iterdir()) == []  # failed prepares leave nothing


def test_list_remove_prune(store: rootfs.ImageStore, layered: rootfs.Image,
                           busybox_image: rootfs.Image) -> None:
    require_binaries("mkfs.erofs", "mkfs.ext4")
    assert [i.ref for i in store.list()] == ["docker.io/local/busybox:test",
                                            "docker.io/local/layered:1"]
    kept = store.prepare(busybox_image, upper_size_mib=16)
    store.image_disk(layered)
    store.remove("local/layered:1")
    store.remove(busybox_image)
    with pytest.raises(rootfs.ImageNotFoundError):
        store.remove("local/layered:1")
    with pytest.raises(rootfs.ImageNotFoundError, match="not in the store"):
        store.get("local/layered:1")
    res = store.prune(grace_seconds=0)
    assert res.blobs == 2 + len(layered.layers) and res.disks == 1 and res.trees == 1
    assert kept.image_disk is not None and kept.image_disk.exists()  # a sandbox still uses it
    kept.remove()
    res2 = store.prune(grace_seconds=0)
    assert res2.disks == 1 and res2.blobs == 3
    assert store.list() == []


def test_prune_grace_and_prepared_roots_outside_the_store(
        store: rootfs.ImageStore, layered: rootfs.Image, tmp_path: Path) -> None:
    require_binaries("mkfs.erofs", "mkfs.ext4")
    dest = tmp_path / "sandbox-1"
    root = store.prepare(layered, upper_size_mib=16, dest=dest)
    assert root.upper_disk == dest.absolute() / "upper.ext4" and root.upper_disk.exists()
    store.remove(layered)
    assert store.prune() == rootfs.PruneResult(0, 0, 0, 0)  # everything is younger than 10 min
    store.prune(grace_seconds=0)
    assert root.image_disk is not None and root.image_disk.exists()  # dest still uses it
    import shutil

    shutil.rmtree(dest)  # the sandbox went away without remove()
    res = store.prune(grace_seconds=0)
    assert res.disks == 1 and not root.image_disk.exists()
    assert list((store.home / "prepared").iterdir()) == []


def test_merged_root_mirrors_image_root(store: rootfs.ImageStore, layered: rootfs.Image,
                                        tmp_path: Path) -> None:
    require_root()
    require_binaries("mkfs.erofs", "mkfs.ext4", "losetup", "mount")
    root = store.prepare(layered, upper_size_mib=16, patches=[Patch.mkdir("/x")])
    lower_st = os.stat(store.rootfs_dir(layered))
    with mount_plan(root.mount_plan(), tmp_path / "mnt") as merged:
        st = os.stat(merged)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (stat.S_IMODE(lower_st.st_mode),
                                                        lower_st.st_uid)


def test_image_store_is_a_root_provider(store: rootfs.ImageStore) -> None:
    assert isinstance(store, rootfs.RootProvider)
    provider: rootfs.RootProvider = store  # also checked statically by mypy
    assert provider is store
