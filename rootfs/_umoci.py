"""Unpacking through umoci: the reference :class:`~rootfs.protocols.Unpacker`.

The project's design names umoci for unpacking; our own extractor
(:class:`~rootfs._unpack.NativeUnpacker`) stays the default because it is about twice
as fast, refuses hostile layers instead of clamping them, and needs no root. umoci
stays the reference: the tests unpack the same images with both and compare the trees,
and ``python -m benchmarks.rootfs`` reports the speed ratio.

:class:`UmociUnpacker` applies one layer at a time: it first reads the layer with our
checks (names, entry types and devices, size and count limits, the diff_id), so a
hostile or corrupt layer is refused before umoci writes anything; then it runs
``umoci raw unpack`` on a one-layer OCI layout whose only blob is the stored layer
(umoci keeps every path inside the root: it clamps what we refuse); then it applies
our whiteout rules again and resolves every entry's parent with the rule the native
extractor uses, so a layer that relied on a ``..`` escaping the root is refused too.

Example::

    store = ImageStore(unpacker="umoci")        # or ImageStore(unpacker=UmociUnpacker())
    store.unpack(img, "/tmp/root-by-umoci")
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import BinaryIO, cast

from rootfs._image import OCI_CONFIG, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_MANIFEST
from rootfs._unpack import (
    Compression,
    LayerEntry,
    UnpackState,
    apply_whiteout,
    check_diff_id,
    layer_compression,
    resolve_entry,
    scan_layer,
)
from rootfs.errors import ImageFormatError, RootfsError

_CHUNK = 1 << 20
_ROOTLESS_XATTR = "user.rootlesscontainers"


class UmociUnpacker:
    """``umoci raw unpack`` per layer, between our safety checks (see the module doc).

    ``binary``: the umoci executable (default: ``umoci`` on ``PATH``). A missing one
    raises :class:`~rootfs.errors.RootfsError` here, before any work.

    Example (``ImageStore(unpacker=UmociUnpacker())`` or ``unpacker="umoci"``)::

        >>> from rootfs import UmociUnpacker
        >>> UmociUnpacker().name
        'umoci'
        >>> UmociUnpacker("no-such-umoci")
        Traceback (most recent call last):
        rootfs.errors.RootfsError: umoci binary 'no-such-umoci' not found: install umoci (apt-get install umoci) or use unpacker='native'
    """

    name = "umoci"

    def __init__(self, binary: str | os.PathLike[str] = "umoci") -> None:
        found = shutil.which(os.fspath(binary))
        if found is None:
            raise RootfsError(f"umoci binary {os.fspath(binary)!r} not found: install umoci "
                              "(apt-get install umoci) or use unpacker='native'")
        self.binary = found

    def apply(self, blob: Path, dest: Path, *, state: UnpackState,
              expected_diff_id: str | None = None) -> str:
        """Apply layer file ``blob`` onto ``dest`` with umoci; return its diff_id.

        Example::

            diff_id = UmociUnpacker().apply(Path("layer.tar.gz"), Path("root"),
                                            state=UnpackState())
        """
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="rootfs-umoci-") as td:
            work = Path(td)
            entries, diff_id, kind, layer_digest = _preflight(blob, state, work / "layer.tar")
            check_diff_id(diff_id, expected_diff_id)
            layer = work / "layer.tar" if kind == "zstd" else blob
            _write_layout(work / "oci", layer, layer_digest, diff_id, gzip=kind == "gzip")
            cmd = [self.binary, "--log", "error", "raw", "unpack"]
            rootless = os.geteuid() != 0
            if rootless:
                cmd.append("--rootless")
            cmd += ["--image", f"{work / 'oci'}:layer", os.fspath(dest)]
            run = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if run.returncode != 0:
                detail = (run.stderr.strip().splitlines() or ["no output"])[-1]
                raise ImageFormatError(f"umoci could not apply the layer: {detail[:300]}")
        _after(entries, os.fspath(dest), state, rootless)
        return diff_id


class _RawDigest:
    """Reads through to ``f``, hashing each byte of the file once, in file order.

    :func:`~rootfs._unpack.decompressed` reads the magic and seeks back: bytes read
    again are not hashed again.
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.hashed = 0  # length of the prefix of the file hashed so far

    def read(self, n: int = -1) -> bytes:
        pos = self.f.tell()
        data = self.f.read(n)
        if pos <= self.hashed < pos + len(data):
            self.sha.update(data[self.hashed - pos:])
            self.hashed = pos + len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.f.seek(offset, whence)

    def digest(self) -> str:
        """The whole file's digest (reading whatever the reads so far left out)."""
        self.f.seek(self.hashed)
        while self.read(_CHUNK):
            pass
        return "sha256:" + self.sha.hexdigest()


def _preflight(blob: Path, state: UnpackState,
               plain_out: Path) -> tuple[list[LayerEntry], str, Compression, str]:
    """Our per-entry checks over the whole layer, in one read of it.

    Returns (entries, diff_id, compression, digest of the file umoci is to read). A
    zstd layer is written decompressed to ``plain_out`` (umoci reads gzip or tar), so
    that file's digest, like a plain tar's, is the diff_id; a gzip layer's is taken
    from its compressed bytes as they are read.
    """
    with open(blob, "rb") as f:
        kind = layer_compression(f.read(4))
        f.seek(0)
        if kind == "zstd":
            with open(plain_out, "wb") as out:
                entries, diff_id = scan_layer(f, state=state, copy_to=out)
            return entries, diff_id, kind, diff_id
        if kind == "tar":
            entries, diff_id = scan_layer(f, state=state)
            return entries, diff_id, kind, diff_id
        raw = _RawDigest(f)
        entries, diff_id = scan_layer(cast(BinaryIO, raw), state=state)
        return entries, diff_id, kind, raw.digest()


def _write_layout(oci: Path, layer: Path, layer_digest: str, diff_id: str, *,
                  gzip: bool) -> None:
    """A one-image OCI layout (tag ``layer``) whose only layer is ``layer`` (symlinked).

    ``layer_digest``: the sha256 of ``layer``'s bytes, as :func:`_preflight` found it.
    """
    blobs = oci / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        hexd = hashlib.sha256(data).hexdigest()
        (blobs / hexd).write_bytes(data)
        return "sha256:" + hexd, len(data)

    os.symlink(layer.absolute(), blobs / layer_digest.removeprefix("sha256:"))
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    cdig, csize = put(json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cdig, "size": csize},
                "layers": [{"mediaType": OCI_LAYER_GZIP if gzip else OCI_LAYER_TAR,
                            "digest": layer_digest, "size": layer.stat().st_size}]}
    mdig, msize = put(json.dumps(manifest).encode())
    (oci / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (oci / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": mdig, "size": msize,
                       "annotations": {"org.opencontainers.image.ref.name": "layer"}}]}))


def _after(entries: list[LayerEntry], root: str, state: UnpackState, rootless: bool) -> None:
    """Our parent rule and whiteouts over what umoci wrote, then ownership."""
    created = {e.rel for e in entries if e.kind == "node"}
    for e in entries:
        resolve_entry(root, e)  # refuses a parent that escapes the root
        if e.kind in ("whiteout", "opaque"):
            apply_whiteout(root, e, created)
    fix_owner = not state.limits.keep_owner() and os.geteuid() == 0
    if not (fix_owner or rootless):
        return
    uid, gid = os.geteuid(), os.getegid()
    for e in entries:
        path = resolve_entry(root, e) if e.kind in ("node", "root") else None
        if path is None:
            continue
        try:
            if fix_owner:
                os.lchown(path, uid, gid)
            if rootless:
                os.removexattr(path, _ROOTLESS_XATTR, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise
