"""Build layer tarballs entry by entry (including hostile ones) for tests and benchmarks."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field


@dataclass
class E:
    """One tar entry: kind in file/dir/symlink/hardlink/chr/blk/fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    link: str = ""
    uid: int = 0
    gid: int = 0
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, str] = field(default_factory=dict)
    size: int | None = None  # claimed size (hostile) without data


def layer(*entries: E) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.uid, ti.gid = e.uid, e.gid
            ti.mtime = 1_700_000_000
            if e.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind == "file":
                ti.type = tarfile.REGTYPE
                ti.mode = 0o644 if e.mode is None else e.mode
                if e.size is not None:
                    ti.size = e.size
                    tar.addfile(ti)  # header only: a claim with no data behind it
                    continue
                ti.size = len(e.data)
                tar.addfile(ti, io.BytesIO(e.data))
                continue
            ti.mode = {"dir": 0o755, "symlink": 0o777}.get(e.kind, 0o644) if e.mode is None \
                else e.mode
            ti.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "blk": tarfile.BLKTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[e.kind]
            ti.linkname = e.link
            ti.devmajor, ti.devminor = e.dev
            tar.addfile(ti)
    return buf.getvalue()


def base_layers() -> list[bytes]:
    """Three layers exercising whiteouts, an opaque dir, hardlinks, symlinks, xattrs."""
    l1 = layer(
        E("etc", "dir"),
        E("etc/motd", data=b"base motd\n"),
        E("etc/hosts", data=b"127.0.0.1 localhost\n", mode=0o640),
        E("etc/shadow-like", data=b"secret\n", mode=0o600, uid=0, gid=42),
        E("opt", "dir"),
        E("opt/app", "dir"),
        E("opt/app/old1", data=b"1"),
        E("opt/app/old2", data=b"2"),
        E("usr", "dir"),
        E("usr/lib", "dir"),
        E("usr/lib/libx.so", data=b"ELF", mode=0o755),
        E("lib", "symlink", link="usr/lib"),
        E("data", "dir", mode=0o1777),
        E("data/file", data=b"payload", uid=1000, gid=1000, xattrs={"user.note": "kept"}),
        E("data/hard", "hardlink", link="data/file"),
        E("gone", data=b"to be whited out"),
        E("bin", "dir"),
        E("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755),
    )
    l2 = layer(
        E("opt/app", "dir", mode=0o750),
        E("opt/app/.wh..wh..opq"),
        E("opt/app/new", data=b"new"),
        E(".wh.gone"),
        E("etc/.wh.motd"),
        E("etc/added", data=b"added in l2\n"),
    )
    l3 = layer(
        E("etc/motd", data=b"motd is back\n"),
        E("usr/lib/liby.so", data=b"ELF2"),
    )
    return [l1, l2, l3]
