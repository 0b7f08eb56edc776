"""Garbage collection: prepared roots whose owner is gone, then unused content.

A prepared root's owner is its ``dest`` directory (gone = removed) or, without
``dest``, the process that prepared it (gone = that pid no longer runs with the
recorded start time). Content younger than the grace period is kept, so a pull or
load running in another process (blobs stored, tag not yet written) is never pruned.

Example::

    result = prune_store(store, grace_seconds=0)
    print(result.blobs, result.bytes_freed)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rootfs._blobs import BlobDir
from rootfs._fs import lock, process_start_time
from rootfs.errors import RootfsError


@dataclass(frozen=True)
class PruneResult:
    """What :meth:`ImageStore.prune` deleted (``prepared``: prepared roots of gone owners).

    Example::

        >>> import rootfs
        >>> rootfs.ImageStore(Path("images")).prune()
        PruneResult(blobs=0, trees=0, disks=0, bytes_freed=0, prepared=0)
    """

    blobs: int
    trees: int
    disks: int
    bytes_freed: int
    prepared: int = 0


def prune_store(store: BlobDir, *, grace_seconds: float) -> PruneResult:
    """Free prepared roots of gone owners, then what no tag or prepared root uses.

    Example::

        prune_store(store, grace_seconds=600.0)
    """
    home = store.home
    cutoff = time.time() - grace_seconds
    keep_blobs: set[str] = set()
    keep_ids: set[str] = set()
    prepared, freed = _prune_prepared(home, cutoff)
    users = [(p, "ref", "digest") for p in (home / "refs").glob("*.json")]
    users += [(p, "image", "digest") for p in (home / "prepared").glob("*/meta.json")]
    for p, ref_key, digest_key in users:
        try:
            rec = json.loads(p.read_text())
            img = store.image_from_manifest(rec[ref_key], rec[digest_key])
        except (OSError, ValueError, KeyError, RootfsError):
            continue
        keep_blobs.update({img.digest, img.config_digest, *(ly.digest for ly in img.layers)})
        keep_ids.add(img.id.partition(":")[2])
    blobs = trees = disks = 0
    with lock(home / "locks", "prune"):
        for p in (home / "blobs" / "sha256").iterdir():
            st = p.stat()
            if f"sha256:{p.name}" not in keep_blobs and not p.name.startswith(".") \
                    and st.st_mtime < cutoff:
                freed += st.st_size
                p.unlink()
                blobs += 1
        for p in (home / "rootfs").iterdir():
            if p.name not in keep_ids and p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)
                trees += 1
        for p in (home / "disks").iterdir():
            if p.name.partition(".")[0] not in keep_ids and p.stat().st_mtime < cutoff:
                freed += p.stat().st_blocks * 512
                p.unlink()
                disks += 1
    return PruneResult(blobs, trees, disks, freed, prepared)


def _prune_prepared(home: Path, cutoff: float) -> tuple[int, int]:
    """Remove prepared roots whose owner is gone; (count, bytes freed)."""
    count = freed = 0
    for record in (home / "prepared").iterdir():
        if not record.is_dir():
            continue
        rec: dict[str, Any] | None
        try:
            loaded = json.loads((record / "meta.json").read_text())
            rec = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            rec = None  # a prepare from before meta.json came first, or a crashed one
        if not owner_gone(record, rec, cutoff):
            continue
        # without dest the upper disk is in the record; with dest it went with dest
        freed += sum(_disk_usage(p) for p in record.rglob("*") if p.is_file())
        shutil.rmtree(record, ignore_errors=True)
        count += 1
    return count, freed


def owner_gone(record: Path, rec: dict[str, Any] | None, cutoff: float) -> bool:
    """Whether the prepared root at ``record`` has lost its owner (see the module doc).

    Example::

        owner_gone(store.home / "prepared" / rid, json.loads(meta), time.time() - 600)
    """
    if rec is None:  # no readable record: judge by age only
        try:
            return record.stat().st_mtime < cutoff
        except OSError:
            return False
    owner = rec.get("owner")
    if isinstance(owner, dict):
        pid, start = owner.get("pid"), owner.get("start")
        if not isinstance(pid, int) or isinstance(pid, bool):
            return True
        now = process_start_time(pid)
        return now is None or (start is not None and now != start)
    sandbox = Path(str(rec.get("sandbox_dir") or record))
    if sandbox != record:  # the owner is the dest directory
        return not sandbox.is_dir()
    created = rec.get("created")  # a record from before owners were recorded
    return not isinstance(created, int | float) or created < cutoff


def _disk_usage(p: Path) -> int:
    try:
        return p.stat().st_blocks * 512
    except OSError:
        return 0
