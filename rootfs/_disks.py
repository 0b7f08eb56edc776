"""Guest disks: read-only image disks (erofs/ext4), sparse ext4 upper disks, PreparedRoot.

Example::

    root = store.prepare(image, patches=[Patch.mkdir("/data")])
    plan = root.mount_plan()   # handed to the guest agent
    # {"kind": "overlay", "lower": [{"disk": ".../<id>.erofs", "fstype": "erofs"}],
    #  "upper": {"disk": ".../upper.ext4", "fstype": "ext4", "upperdir": "/upper", "workdir": "/work"}}
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rootfs._patches import Patch, PatchTarget
from rootfs.errors import DiskError, PatchError

ImageFormat = Literal["erofs", "ext4", "raw", "qcow2"]
RootKind = Literal["overlay", "bind", "disk"]
QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class PreparedRoot:
    """The disks (or directory) a microVM boots from, plus the guest mount plan.

    Example::

        >>> import rootfs
        >>> Path("srv").mkdir()
        >>> root = rootfs.prepare_bind_root(Path("srv"))
        >>> root.kind, root.mount_plan() == {"kind": "bind", "dir": str(Path("srv").resolve())}
        ('bind', True)
    """

    kind: RootKind
    image_disk: Path | None = None
    image_format: ImageFormat | None = None
    upper_disk: Path | None = None
    upper_format: Literal["ext4"] = "ext4"
    bind_dir: Path | None = None
    fstype: str = "ext4"
    sandbox_dir: Path | None = None
    image_id: str | None = None
    record_dir: Path | None = None

    def mount_plan(self) -> dict[str, Any]:
        """JSON/CBOR-serialisable instructions for the guest agent.

        Example::

            json.dumps(root.mount_plan())
        """
        if self.kind == "overlay":
            assert self.image_disk is not None and self.upper_disk is not None
            return {
                "kind": "overlay",
                "lower": [{"disk": str(self.image_disk), "fstype": self.image_format}],
                "upper": {
                    "disk": str(self.upper_disk),
                    "fstype": self.upper_format,
                    "upperdir": "/upper",
                    "workdir": "/work",
                },
            }
        if self.kind == "disk":
            assert self.image_disk is not None
            return {"kind": "disk", "root": {"disk": str(self.image_disk), "fstype": self.fstype}}
        assert self.bind_dir is not None
        return {"kind": "bind", "dir": str(self.bind_dir)}

    def remove(self) -> None:
        """Free this prepared root now: delete its upper disk and its record in the store
        (``prepared/<id>/``); the shared image disk stays (``prune`` frees it once no
        tag or prepared root uses it). A ``dest`` directory given to ``prepare`` is
        removed too if nothing else is left in it. Idempotent; a bind or disk root has
        nothing to free.

        Without ``remove()``, :meth:`rootfs.ImageStore.prune` frees the root once its
        owner is gone (the ``dest`` directory, or else the process that prepared it).

        Example::

            root = store.prepare(img, upper_size_mib=64)
            try:
                boot(root.mount_plan())
            finally:
                root.remove()
        """
        if self.upper_disk is not None:
            with contextlib.suppress(FileNotFoundError):
                self.upper_disk.unlink()
        if self.record_dir is not None:
            shutil.rmtree(self.record_dir, ignore_errors=True)
        if self.sandbox_dir is not None and self.sandbox_dir != self.record_dir:
            with contextlib.suppress(OSError):
                self.sandbox_dir.rmdir()  # only when empty: it is the caller's directory


def _run(argv: list[str], what: str) -> None:
    exe = shutil.which(argv[0])
    if exe is None:
        raise DiskError(f"{what}: {argv[0]} is not installed (Debian: erofs-utils / e2fsprogs)")
    proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DiskError(f"{what}: {argv[0]} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes, inodes) of a directory tree (apparent sizes, hardlinks counted once).

    Example::

        nbytes, inodes = tree_size(Path("rootfs"))
    """
    total, count = 0, 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        count += len(dirnames) + len(filenames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_size
    return total, count


def build_erofs(src: Path, out: Path) -> None:
    """Build an uncompressed erofs image of ``src`` at ``out`` (overwritten).

    Example::

        build_erofs(Path("rootfs"), Path("image.erofs"))
    """
    argv = ["mkfs.erofs", "--quiet", "-Eforce-inode-extended"]
    if os.geteuid() != 0:
        argv.append("--all-root")
    _run([*argv, str(out), str(src)], f"building erofs image {out}")


def build_ext4(src: Path | None, out: Path, size_mib: int, *, label: str = "") -> None:
    """Create a sparse ext4 image of ``size_mib`` MiB at ``out``, populated from ``src``.

    Example::

        build_ext4(Path("staging"), Path("upper.ext4"), 4096)
    """
    if size_mib < 8:
        raise DiskError(f"ext4 disk size {size_mib} MiB too small (minimum 8)")
    with open(out, "wb") as f:
        f.truncate(size_mib << 20)
    argv = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
            "-m", "0"]
    if label:
        argv += ["-L", label]
    if src is not None:
        argv += ["-d", str(src)]
    _run([*argv, str(out)], f"building ext4 image {out}")


def ext4_size_for(src: Path) -> int:
    """A comfortable ext4 size in MiB for the tree at ``src``.

    Example::

        build_ext4(src, out, ext4_size_for(src))
    """
    nbytes, inodes = tree_size(src)
    return max(16, int((nbytes * 1.25 + inodes * 4096) / (1 << 20)) + 16)


def detect_format(path: Path) -> Literal["raw", "qcow2"]:
    """``qcow2`` by magic (or ``.qcow2`` extension), else ``raw``.

    Example::

        detect_format(Path("disk.img"))
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise DiskError(f"cannot read disk image {str(path)!r}: {exc.strerror}") from None
    if head == QCOW2_MAGIC or path.suffix == ".qcow2":
        return "qcow2"
    return "raw"


def prepare_disk_root(
    path: str | os.PathLike[str],
    *,
    format: Literal["raw", "qcow2"] | None = None,
    fstype: str = "ext4",
    patches: Iterable[Patch] = (),
) -> PreparedRoot:
    """A root that is a whole disk image (raw/qcow2); patches are refused.

    Example::

        >>> from rootfs import prepare_disk_root
        >>> _ = Path("debian.img").write_bytes(bytes(1 << 20))   # raw (or a .qcow2)
        >>> root = prepare_disk_root("debian.img")
        >>> root.image_format, root.mount_plan()["root"]["fstype"]
        ('raw', 'ext4')
    """
    plist = list(patches)
    p = Path(path)
    if plist:
        raise PatchError(
            f"patches are not supported for disk-image roots ({str(p)!r}); "
            f"got {len(plist)} patch(es): use an OCI image or a bind root"
        )
    if not p.is_file():
        raise DiskError(f"disk image {str(p)!r} does not exist or is not a file")
    fmt = format or detect_format(p)
    if fmt not in ("raw", "qcow2"):
        raise DiskError(f"disk image format {fmt!r} not supported: use 'raw' or 'qcow2'")
    if not fstype or not fstype.isalnum():
        raise DiskError(f"bad fstype {fstype!r}")
    return PreparedRoot(kind="disk", image_disk=p.resolve(), image_format=fmt, fstype=fstype)


def prepare_bind_root(
    path: str | os.PathLike[str], *, patches: Iterable[Patch] = ()
) -> PreparedRoot:
    """A root served from a host directory; patches modify it in place.

    Example::

        >>> from rootfs import Patch, prepare_bind_root
        >>> Path("srv").mkdir()
        >>> root = prepare_bind_root("srv", patches=[Patch.text("/etc/motd", "hi\\n")])
        >>> Path("srv/etc/motd").read_text(), root.bind_dir == Path("srv").resolve()
        ('hi\\n', True)
    """
    p = Path(path)
    if not p.is_dir():
        raise DiskError(f"bind root {str(p)!r} is not a directory")
    PatchTarget(p).apply(patches)
    return PreparedRoot(kind="bind", bind_dir=p.resolve())
