"""The store's files: one atomic, fsynced publish for all of them, blobs verified while
streamed, and the layout code independent of the store (no import cycle)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rootfs
from rootfs._fs import atomic_replace, atomic_write


def test_atomic_write_publishes_whole_files_with_their_mode(tmp_path: Path) -> None:
    target = tmp_path / "d" / "ref.json"
    atomic_write(target, b"one", 0o600)
    atomic_write(target, b"two", 0o444)
    assert target.read_bytes() == b"two"
    assert target.stat().st_mode & 0o777 == 0o444
    assert os.listdir(target.parent) == ["ref.json"]  # no temporary left behind


def test_a_failed_atomic_replace_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="mkfs failed"), \
            atomic_replace(target, 0o444) as tmp:
        tmp.write_bytes(b"half a disk")
        raise RuntimeError("mkfs failed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["disk.img"]


def test_blobs_are_verified_while_streamed(store: rootfs.ImageStore) -> None:
    data = os.urandom(3 << 20)
    want = "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.put_blob_stream(io.BytesIO(data)) == want
    assert store.read_blob(want) == data
    assert store.blob_path(want).stat().st_mode & 0o777 == 0o444
    other = b"not what the digest says"
    with pytest.raises(rootfs.DigestError, match="digest mismatch"):
        store.put_blob_stream(io.BytesIO(other), "sha256:" + "1" * 64)
    assert not store.has_blob("sha256:" + hashlib.sha256(other).hexdigest())
    assert os.listdir(store.home / "tmp") == []


def test_blob_store_protocol_and_layout_without_the_store(store: rootfs.ImageStore) -> None:
    assert isinstance(store, rootfs.BlobStore)
    code = ("import sys, rootfs._layout, rootfs._image; "
            "assert 'rootfs._store' not in sys.modules, sorted(sys.modules); "
            "from rootfs._store import host_platform; "
            "assert host_platform() == rootfs._image.host_platform()")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2])
