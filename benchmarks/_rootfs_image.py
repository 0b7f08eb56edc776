"""A deterministic multi-layer test image (~30 MB uncompressed) for the rootfs benchmark."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

_MTIME = 1_700_000_000


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, kind: bytes = b"0",
         mode: int = 0o644, link: str = "") -> None:
    ti = tarfile.TarInfo(name)
    ti.mtime = _MTIME
    ti.mode = mode
    ti.type = kind
    ti.linkname = link
    if data is not None:
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    else:
        tar.addfile(ti)


def _layer(build: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)  # type: ignore[operator]
    return buf.getvalue()


def bench_layers(scale: float = 1.0) -> list[bytes]:
    """Four layers: many small files, random blobs, compressible text, then changes."""
    rng = random.Random(1234)
    busybox = Path("/bin/busybox").read_bytes() if Path("/bin/busybox").exists() else b"\0" * 2_000_000
    n_small = int(1500 * scale)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(500)]

    def base(tar: tarfile.TarFile) -> None:
        for d in ("bin", "etc", "usr", "usr/lib", "usr/share", "var", "opt", "opt/cache"):
            _add(tar, d, kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "bin/busybox", busybox, mode=0o755)
        for applet in ("sh", "ls", "cat", "cp", "mv", "rm", "echo", "grep"):
            _add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        _add(tar, "lib", kind=tarfile.SYMTYPE, link="usr/lib", mode=0o777)
        for i in range(n_small):
            d = f"usr/share/pkg{i % 60}"
            if i < 60:
                _add(tar, d, kind=tarfile.DIRTYPE, mode=0o755)
            body = b" ".join(rng.choice(words) for _ in range(rng.randint(60, 600)))
            _add(tar, f"{d}/file{i}.txt", body)
        for i in range(40):
            _add(tar, f"opt/cache/c{i}", b"cache" * 100)
        _add(tar, "etc/motd", b"bench image\n")
        _add(tar, "etc/hosts", b"127.0.0.1 localhost\n")

    def blobs(tar: tarfile.TarFile) -> None:
        for i in range(int(12 * scale)):
            _add(tar, f"usr/lib/blob{i}.so", rng.randbytes(1 << 20), mode=0o755)

    def text(tar: tarfile.TarFile) -> None:
        _add(tar, "usr/share/doc", kind=tarfile.DIRTYPE, mode=0o755)
        for i in range(int(50 * scale)):
            lines = b"".join(b"line %d of doc %d: " % (j, i) + rng.choice(words) + b"\n"
                             for j in range(8000))
            _add(tar, f"usr/share/doc/doc{i}.txt", lines[: 240_000])

    def changes(tar: tarfile.TarFile) -> None:
        _add(tar, "opt/cache", kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "opt/cache/.wh..wh..opq")
        _add(tar, "opt/cache/fresh", b"fresh")
        for i in range(0, 200, 2):
            _add(tar, f"usr/share/pkg{i % 60}/.wh.file{i}.txt")
        _add(tar, "etc/motd", b"bench image v2\n")
        _add(tar, "usr/lib/blob0-link.so", kind=tarfile.LNKTYPE, link="usr/lib/blob0.so",
             mode=0o755)

    return [_layer(base), _layer(blobs), _layer(text), _layer(changes)]
