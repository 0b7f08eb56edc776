"""Prepared roots have an owner and a lifetime: ``remove()`` frees one now, ``prune()``
frees those whose owner (the ``dest`` directory, or else the preparing process) is gone,
so ``rm`` + ``prune`` leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rootfs
from rootfs import process_start_time
from tests.rootfs._layers import base_layers
from tests.support import require_binaries

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def layered(store: rootfs.ImageStore) -> rootfs.Image:
    require_binaries("mkfs.erofs", "mkfs.ext4")
    return rootfs.image_from_layers(store, "local/layered:1", base_layers())


def _records(store: rootfs.ImageStore) -> list[Path]:
    return sorted((store.home / "prepared").iterdir())


def _everything(store: rootfs.ImageStore) -> list[str]:
    return sorted(str(p.relative_to(store.home)) for sub in ("blobs/sha256", "rootfs", "disks",
                                                              "prepared", "refs", "tmp")
                  for p in (store.home / sub).iterdir())


def test_remove_frees_the_upper_disk_and_the_record(store: rootfs.ImageStore,
                                                    layered: rootfs.Image) -> None:
    root = store.prepare(layered, upper_size_mib=64)
    assert root.upper_disk is not None and root.upper_disk.exists()
    (meta,) = [json.loads((r / "meta.json").read_text()) for r in _records(store)]
    assert meta["owner"] == {"pid": os.getpid(), "start": process_start_time(os.getpid())}
    assert meta["complete"] is True
    root.remove()
    assert not root.upper_disk.exists() and _records(store) == []
    root.remove()  # idempotent


def test_remove_with_dest_keeps_the_callers_directory(store: rootfs.ImageStore,
                                                      layered: rootfs.Image,
                                                      tmp_path: Path) -> None:
    dest = tmp_path / "sandbox"
    root = store.prepare(layered, upper_size_mib=16, dest=dest)
    (dest / "console.log").write_text("the caller's file")
    root.remove()
    assert root.upper_disk is not None and not root.upper_disk.exists()
    assert (dest / "console.log").exists() and _records(store) == []
    empty = tmp_path / "empty"
    store.prepare(layered, upper_size_mib=16, dest=empty).remove()
    assert not empty.exists()  # nothing else was in it


def test_prune_frees_roots_of_dead_owners_only(store: rootfs.ImageStore, layered: rootfs.Image,
                                               tmp_path: Path) -> None:
    mine = store.prepare(layered, upper_size_mib=64)
    # another process prepares and exits without remove()
    code = textwrap.dedent(f"""
        import rootfs
        store = rootfs.ImageStore({str(store.home)!r})
        root = store.prepare(store.get("local/layered:1"), upper_size_mib=4096)
        print(root.upper_disk)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True, cwd=ROOT)
    orphan = Path(out.stdout.strip())
    assert orphan.exists() and len(_records(store)) == 2
    res = store.prune()  # default grace: the dead owner is enough
    assert res.prepared == 1 and res.bytes_freed > 0
    assert not orphan.exists() and mine.upper_disk is not None and mine.upper_disk.exists()
    assert len(_records(store)) == 1
    # a recycled pid (same pid, another start time) is not the owner any more
    (meta_path,) = [r / "meta.json" for r in _records(store)]
    meta = json.loads(meta_path.read_text())
    meta["owner"]["start"] = meta["owner"]["start"] + 1
    meta_path.write_text(json.dumps(meta))
    assert store.prune().prepared == 1 and not mine.upper_disk.exists()


def test_rm_and_prune_leave_nothing(store: rootfs.ImageStore, layered: rootfs.Image,
                                    tmp_path: Path) -> None:
    dest = tmp_path / "sandbox-1"
    with_dest = store.prepare(layered, upper_size_mib=16, dest=dest)
    code = textwrap.dedent(f"""
        import rootfs
        store = rootfs.ImageStore({str(store.home)!r})
        store.prepare(store.get("local/layered:1"), upper_size_mib=64)
    """)
    subprocess.run([sys.executable, "-c", code], timeout=120, check=True, cwd=ROOT)
    store.remove(layered)
    res = store.prune(grace_seconds=0)
    assert res.prepared == 1  # the dead process's root; dest still exists
    assert with_dest.image_disk is not None and with_dest.image_disk.exists()
    shutil.rmtree(dest)  # the dest owner went away without remove()
    res = store.prune(grace_seconds=0)
    assert res.prepared == 1 and res.disks == 1
    assert _everything(store) == []


def test_crashed_and_legacy_records_are_pruned(store: rootfs.ImageStore, layered: rootfs.Image,
                                               tmp_path: Path) -> None:
    base = store.home / "prepared"
    (base / "crashed").mkdir()  # a prepare killed before it wrote anything
    (base / "crashed" / "upper.ext4").write_bytes(b"x" * 4096)
    legacy = base / "legacy"
    legacy.mkdir()
    (legacy / "upper.ext4").write_bytes(b"y" * 4096)
    (legacy / "meta.json").write_text(json.dumps({
        "image": layered.ref, "image_id": layered.id, "digest": layered.digest,
        "image_disk": "", "sandbox_dir": str(legacy), "created": 1.0}))
    assert store.prune().prepared == 1  # legacy is old; crashed is younger than the grace
    assert store.prune(grace_seconds=0).prepared == 1
    assert _records(store) == []


def test_cli_prepare_dest_and_prune(store: rootfs.ImageStore, layered: rootfs.Image,
                                    tmp_path: Path) -> None:
    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "rootfs", "--home", str(store.home), *args],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    dest = tmp_path / "kept"
    cli("prepare", "local/layered:1", "--upper-size-mib", "16", "--dest", str(dest))
    cli("prepare", "local/layered:1", "--upper-size-mib", "16")  # owned by that command
    assert "removed 1 prepared roots" in cli("prune")
    assert (dest / "upper.ext4").exists()
