"""From stored layers to disks: flattened trees, shared image disks, prepared roots.

``rootfs/<config-hex>/`` is the flattened tree of an image (built once by the store's
:class:`~rootfs.protocols.Unpacker`), ``disks/<config-hex>.<fmt>`` its read-only image
disk shared by every sandbox, and ``prepared/<id>/meta.json`` one prepared root (its
image, owner and upper disk with the patches baked in).

Example::

    tree = rootfs_tree(store, img, unpacker=NativeUnpacker(), limits=UnpackLimits())
    disk = image_disk(store, img, "erofs", tree)
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from rootfs._blobs import BlobDir
from rootfs._disks import PreparedRoot, build_erofs, build_ext4, ext4_size_for
from rootfs._fs import atomic_replace, atomic_write, fsync_dir, lock, process_start_time
from rootfs._image import Image
from rootfs._patches import Patch, PatchTarget
from rootfs._unpack import UnpackLimits, UnpackState, remove_node
from rootfs.errors import DiskError, ImageNotFoundError, RootfsError
from rootfs.protocols import Unpacker


def unpack_image(store: BlobDir, img: Image, dest: Path, *, unpacker: Unpacker,
                 limits: UnpackLimits) -> UnpackState:
    """Flatten ``img``'s layers into ``dest`` (absent or empty) with ``unpacker``.

    On any failure ``dest`` is left as it was found (absent, or empty).

    Example::

        unpack_image(store, img, Path("/tmp/root"), unpacker=NativeUnpacker(),
                     limits=UnpackLimits())
    """
    existed = dest.exists()
    if existed and (not dest.is_dir() or any(dest.iterdir())):
        raise RootfsError(f"unpack destination {str(dest)!r} exists and is not an empty dir")
    dest.mkdir(parents=True, exist_ok=True)
    state = UnpackState(limits)
    try:
        for layer, diff_id in zip(img.layers, img.diff_ids, strict=True):
            path = store.blob_path(layer.digest)
            if not path.exists():
                raise ImageNotFoundError(f"layer {layer.digest} of {img.ref} is not in the store")
            unpacker.apply(path, dest, state=state, expected_diff_id=diff_id)
    except BaseException:
        # Never leave a half-applied tree behind (dest was empty or absent).
        if existed:
            for child in dest.iterdir():
                remove_node(os.fspath(child), ignore_errors=True)
        else:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return state


def rootfs_tree(store: BlobDir, img: Image, *, unpacker: Unpacker,
                limits: UnpackLimits) -> Path:
    """The store's cached flattened tree of ``img`` (built on first use).

    Example::

        (rootfs_tree(store, img, unpacker=NativeUnpacker(), limits=UnpackLimits())
         / "bin/sh").exists()
    """
    hexid = img.id.partition(":")[2]
    final = store.home / "rootfs" / hexid
    if final.is_dir():
        return final
    with lock(store.home / "locks", "rootfs-" + hexid):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(dir=store.home / "tmp", prefix="rootfs-"))
        try:
            os.chmod(tmp, 0o755)
            unpack_image(store, img, tmp / "root", unpacker=unpacker, limits=limits)
            # a whole tree, not a file: renamed in one step (a cache, rebuilt from the
            # verified blobs if it is ever removed)
            os.replace(tmp / "root", final)
            fsync_dir(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def image_disk(store: BlobDir, img: Image, fmt: Literal["erofs", "ext4"],
               tree: Callable[[], Path]) -> Path:
    """The read-only image disk of ``img`` (built once per image id from ``tree()``).

    ``tree`` is called only when the disk has to be built.

    Example::

        image_disk(store, img, "erofs", lambda: store.rootfs_dir(img))  # disks/<hex>.erofs
    """
    hexid = img.id.partition(":")[2]
    final = store.home / "disks" / f"{hexid}.{fmt}"
    if final.exists():
        return final
    lower = tree()
    with lock(store.home / "locks", f"disk-{hexid}-{fmt}"):
        if final.exists():
            return final
        with atomic_replace(final, 0o444, tmp_dir=store.home / "tmp",
                            prefix=f"disk-{fmt}-") as tmp:
            if fmt == "erofs":
                build_erofs(lower, tmp)
            else:
                build_ext4(lower, tmp, ext4_size_for(lower), label="rootfs")
    return final


def prepare_root(store: BlobDir, img: Image, *, patches: Iterable[Patch], upper_size_mib: int,
                 image_format: Literal["erofs", "ext4"], disk: Path, lower: Path,
                 dest: str | os.PathLike[str] | None, staging_dir: Path | None) -> PreparedRoot:
    """A fresh sparse ext4 upper disk with ``patches`` baked in over ``lower``.

    ``disk`` is the image disk and ``lower`` its tree (see ``ImageStore.prepare``).

    Example::

        prepare_root(store, img, patches=[], upper_size_mib=512, image_format="erofs",
                     disk=disk, lower=tree, dest=None, staging_dir=Path("/dev/shm"))
    """
    plist = list(patches)
    record = store.home / "prepared" / uuid.uuid4().hex
    sandbox = Path(dest).absolute() if dest is not None else record
    try:
        sandbox.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DiskError(f"cannot create prepare dest {str(sandbox)!r}: "
                        f"{exc.strerror or exc}") from None
    record.mkdir(mode=0o700, parents=True, exist_ok=True)
    upper = sandbox / "upper.ext4"
    meta: dict[str, Any] = {"image": img.ref, "image_id": img.id, "digest": img.digest,
                            "image_disk": str(disk), "sandbox_dir": str(sandbox),
                            "upper_disk": str(upper), "created": time.time()}
    if dest is None:
        meta["owner"] = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
    # recorded before the slow work: a prepare killed half-way is still pruned. Not
    # fsynced: after a crash its owner (this process, or dest) is gone or stale anyway.
    atomic_write(record / "meta.json", json.dumps({**meta, "complete": False}).encode(),
                 durable=False)
    staging = Path(tempfile.mkdtemp(dir=staging_dir or sandbox, prefix=".staging-"))
    ok = False
    try:
        # The overlay's merged root takes its attributes from upperdir: mirror the image.
        root_st = os.stat(lower)
        (staging / "upper").mkdir()
        os.chmod(staging / "upper", stat.S_IMODE(root_st.st_mode))
        (staging / "work").mkdir(0o700)
        if os.geteuid() == 0:
            os.chown(staging / "upper", root_st.st_uid, root_st.st_gid)
        elif plist:
            raise DiskError("baking patches into the upper disk needs root (the guest "
                            "must see root-owned files, whiteouts and trusted xattrs)")
        PatchTarget(staging / "upper", lower).apply(plist)
        build_ext4(staging, upper, upper_size_mib, label="upper")
        os.chmod(upper, 0o600)  # patches may carry secrets
        atomic_write(record / "meta.json", json.dumps({**meta, "complete": True}).encode(),
                     durable=False)
        ok = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not ok:
            shutil.rmtree(record, ignore_errors=True)
            if dest is None:
                shutil.rmtree(sandbox, ignore_errors=True)
            elif upper.exists():
                upper.unlink()
    return PreparedRoot(kind="overlay", image_disk=disk, image_format=image_format,
                        upper_disk=upper, sandbox_dir=sandbox, image_id=img.id,
                        record_dir=record)
