"""The unpacking seam: our extractor and umoci give the same tree from the same images.

umoci (``umoci raw unpack`` per layer, between our checks) is the reference the
native extractor is held to: whiteouts, opaque directories, hardlinks (also to a
lower layer's file), symlinks, modes, owners, xattrs and contents must match, for
gzip, zstd and plain layers, for built, registry-pulled and busybox images. Hostile
layers are refused by both, with the entry named, and leave nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

import rootfs
from rootfs import NativeUnpacker, UmociUnpacker, Unpacker, UnpackLimits
from rootfs._image import OCI_CONFIG, OCI_LAYER_TAR, OCI_LAYER_ZSTD, OCI_MANIFEST
from tests.rootfs._layers import E, base_layers, layer
from tests.rootfs._registry import Registry
from tests.support import require_binaries, require_root

Tree = dict[str, tuple[object, ...]]


def tree(root: Path) -> Tree:
    """Every node under ``root``: mode, owner, content or link target, xattrs, link group."""
    out: Tree = {"": (os.lstat(root).st_mode, os.lstat(root).st_uid, os.lstat(root).st_gid)}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if p.is_symlink():
                content: object = ("->", os.readlink(p))
            elif p.is_file():
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                content = None
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False)
                      for k in sorted(os.listxattr(p, follow_symlinks=False))}
            group = None
            if st.st_nlink > 1 and not p.is_dir():
                group = inodes.setdefault(st.st_ino, rel)  # first name of the inode
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, content, xattrs, group)
    return out


def _zstd_image(store: rootfs.ImageStore, ref: str, layers: list[bytes],
                plain_last: bool = False) -> rootfs.Image:
    """An image whose layers are zstd-compressed (the last one plain if asked)."""
    descs, diff_ids = [], []
    for i, data in enumerate(layers):
        plain = plain_last and i == len(layers) - 1
        blob = data if plain else zstandard.ZstdCompressor(level=3).compress(data)
        descs.append({"mediaType": OCI_LAYER_TAR if plain else OCI_LAYER_ZSTD,
                      "digest": store.put_blob(blob), "size": len(blob)})
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": store.put_blob(config),
                           "size": len(config)}, "layers": descs}
    return store.tag(ref, store.put_blob(json.dumps(manifest).encode()))


def _extra_layer() -> bytes:
    """Hardlinks to a lower layer's file, a symlinked parent, a replaced node, a fifo."""
    return layer(
        E("data/hard2", "hardlink", link="data/file"),
        E("lib/libz.so", data=b"through the lib symlink"),
        E("usr/lib/libx.so", "symlink", link="liby.so"),
        E("etc/hosts", "dir", mode=0o700),
        E("etc/hosts/inner", data=b"file replaced by a dir"),
        E("run", "dir"),
        E("run/pipe", "fifo", mode=0o620),
        E("home", "dir", uid=1000, gid=1000, mode=0o2750),
        E("home/.wh.nothing"),
        E("data/.wh.hard"),
    )


@pytest.fixture(scope="module")
def umoci() -> UmociUnpacker:
    require_root()  # owners are part of the comparison
    require_binaries("umoci")
    return UmociUnpacker()


def _both(home: Path, build: Callable[[rootfs.ImageStore], rootfs.Image]) -> tuple[Tree, Tree]:
    trees = []
    for name in ("native", "umoci"):
        store = rootfs.ImageStore(home / f"store-{name}", unpacker=name)
        img = build(store)
        dest = home / f"root-{name}"
        store.unpack(img, dest)
        trees.append(tree(dest))
    return trees[0], trees[1]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "zstd+plain"])
def test_same_tree_from_both_unpackers(umoci: UmociUnpacker, tmp_path: Path,
                                       compression: str) -> None:
    layers = [*base_layers(), _extra_layer()]

    def build(store: rootfs.ImageStore) -> rootfs.Image:
        if compression == "gzip":
            return rootfs.image_from_layers(store, "local/parity:1", layers)
        return _zstd_image(store, "local/parity:1", layers, plain_last="plain" in compression)

    ours, theirs = _both(tmp_path, build)
    assert ours == theirs
    # the cases the comparison is about are really in the tree
    assert ours["opt/app/new"][3] is not None and "opt/app/old1" not in ours
    assert "gone" not in ours and "data/hard" not in ours
    assert ours["data/hard2"][5] == ours["data/file"][5] == "data/file"
    assert ours["lib"][3] == ("->", "usr/lib") and "usr/lib/libz.so" in ours
    assert ours["home"][1:3] == (1000, 1000)
    assert ours["data/file"][4] == {"user.note": b"kept"}


def test_same_tree_for_a_busybox_image(umoci: UmociUnpacker, tmp_path: Path,
                                       busybox_tree: Path) -> None:
    def build(store: rootfs.ImageStore) -> rootfs.Image:
        return rootfs.build_image(busybox_tree, "local/busybox:parity", store)

    ours, theirs = _both(tmp_path, build)
    assert ours == theirs and "bin/busybox" in ours


def test_same_tree_for_a_pulled_image(umoci: UmociUnpacker, registry: Registry,
                                      tmp_path: Path) -> None:
    src = rootfs.ImageStore(tmp_path / "src")
    img = rootfs.image_from_layers(src, "local/parity:2", [*base_layers(), _extra_layer()])
    rootfs.write_oci_layout(src, tmp_path / "layout", {"v1": img})
    ref = registry.push(tmp_path / "layout", "v1", "parity/pulled")

    def build(store: rootfs.ImageStore) -> rootfs.Image:
        return store.pull(ref, insecure=True)

    ours, theirs = _both(tmp_path, build)
    assert ours == theirs and "etc/added" in ours


HOSTILE = {
    "escaping symlink parent": ([layer(E("escape", "symlink", link="../../../../.."),
                                       E("escape/root/.ssh/authorized_keys", data=b"k"))],
                                r"escape/root/\.ssh/authorized_keys"),
    "dotdot name": ([layer(E("a", "dir"), E("a/../../evil", data=b"x"))], r"\.\."),
    "absolute name": ([layer(E("/etc/evil", data=b"x"))], "absolute"),
    "device node": ([layer(E("dev", "dir"), E("dev/sda", "blk", dev=(8, 0)))], "device"),
    "hardlink outside": ([layer(E("h", "hardlink", link="../etc/shadow"))], r"\.\."),
    "bad whiteout": ([layer(E("etc", "dir"), E("etc/.wh.."))], "whiteout"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("unpacker", ["native", "umoci"])
def test_hostile_layers_are_refused_by_both(umoci: UmociUnpacker, tmp_path: Path,
                                            case: str, unpacker: str) -> None:
    layers, match = HOSTILE[case]
    store = rootfs.ImageStore(tmp_path / "store", unpacker=unpacker)  # type: ignore[arg-type]
    img = rootfs.image_from_layers(store, "local/evil:1",
                                   [layer(E("etc", "dir"), E("etc/ok", data=b"ok")), *layers])
    dest = tmp_path / "dest"
    with pytest.raises(rootfs.UnsafeLayerError, match=match):
        store.unpack(img, dest)
    assert not dest.exists()
    assert not list(Path("/").glob("root/.ssh/authorized_keys.evil"))


@pytest.mark.parametrize("unpacker", ["native", "umoci"])
def test_limits_and_diff_ids_hold_for_both(umoci: UmociUnpacker, tmp_path: Path,
                                           unpacker: str) -> None:
    store = rootfs.ImageStore(tmp_path / "store", unpacker=unpacker,  # type: ignore[arg-type]
                              limits=UnpackLimits(max_files=5))
    img = rootfs.image_from_layers(store, "local/many:1",
                                   [layer(*(E(f"f{i}", data=b"x") for i in range(6)))])
    with pytest.raises(rootfs.UnsafeLayerError, match="max_files"):
        store.unpack(img, tmp_path / "a")
    bad = _zstd_image(store, "local/baddiff:1", [layer(E("f", data=b"1"))])
    cfg = json.loads(store.read_blob(bad.config_digest))
    cfg["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    cbytes = json.dumps(cfg).encode()
    manifest = json.loads(store.read_blob(bad.digest))
    manifest["config"] = {"mediaType": OCI_CONFIG, "digest": store.put_blob(cbytes),
                          "size": len(cbytes)}
    wrong = store.tag("local/baddiff:2", store.put_blob(json.dumps(manifest).encode()))
    with pytest.raises(rootfs.DigestError, match="diff_id"):
        store.unpack(wrong, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_the_seam_takes_names_or_instances_and_refuses_anything_else(tmp_path: Path) -> None:
    assert isinstance(NativeUnpacker(), Unpacker)
    assert rootfs.ImageStore(tmp_path / "s").unpacker.name == "native"
    mine = NativeUnpacker()
    assert rootfs.ImageStore(tmp_path / "s", unpacker=mine).unpacker is mine
    with pytest.raises(rootfs.RootfsError, match=r"unpacker='tar'.*native, umoci"):
        rootfs.ImageStore(tmp_path / "s", unpacker="tar")  # type: ignore[arg-type]
    with pytest.raises(rootfs.RootfsError, match="'/nonexistent/umoci' not found"):
        UmociUnpacker("/nonexistent/umoci")


def test_umoci_store_builds_disks_like_the_native_one(umoci: UmociUnpacker, tmp_path: Path,
                                                      busybox_tree: Path) -> None:
    store = rootfs.ImageStore(tmp_path / "store", unpacker=umoci)
    img = rootfs.build_image(busybox_tree, "local/busybox:umoci", store)
    assert isinstance(store.unpacker, Unpacker) and store.unpacker.name == "umoci"
    root = store.prepare(img, upper_size_mib=16)
    try:
        assert (store.rootfs_dir(img) / "bin/busybox").is_file()
        assert root.image_disk is not None and root.image_disk.stat().st_size > 0
    finally:
        root.remove()


@pytest.mark.parametrize("unpacker", ["native", "umoci"])
def test_owner_fixes_never_follow_a_layer_symlink_to_the_host(umoci: UmociUnpacker,
                                                              tmp_path: Path,
                                                              unpacker: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("host file")
    os.chown(outside / "target", 1234, 1234)
    store = rootfs.ImageStore(tmp_path / "store", unpacker=unpacker,  # type: ignore[arg-type]
                              limits=UnpackLimits(same_owner=False))
    img = rootfs.image_from_layers(store, "local/abs:1", [
        layer(E("evil", "symlink", link=str(outside)),
              E("evil/target", data=b"inside", uid=1000, gid=1000))])
    dest = tmp_path / "dest"
    store.unpack(img, dest)
    # the absolute link restarts at the image root: the file lands inside, host untouched
    assert (dest / str(outside).lstrip("/") / "target").read_bytes() == b"inside"
    assert (outside / "target").read_text() == "host file"
    assert os.stat(outside / "target").st_uid == 1234
