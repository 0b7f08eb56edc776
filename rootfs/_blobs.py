"""Blobs and tags on local disk: the content-addressed half of the image store.

``blobs/sha256/<hex>`` holds manifests, configs and compressed layers (each verified
against its digest before it is published with :func:`rootfs._fs.atomic_replace`);
``refs/<key>.json`` maps a reference to a manifest digest. :class:`BlobDir` implements
:class:`~rootfs.protocols.BlobStore`; :class:`~rootfs.ImageStore` builds on it.

Example::

    >>> import tempfile
    >>> blobs = BlobDir(Path(tempfile.mkdtemp()))
    >>> d = blobs.put_blob(b"{}")
    >>> d
    'sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a'
    >>> blobs.read_blob(d)
    b'{}'
"""

from __future__ import annotations

import builtins
import hashlib
import json
import time
from pathlib import Path
from typing import BinaryIO

from rootfs._fs import atomic_replace, atomic_write
from rootfs._image import Image, parse_config, parse_json, parse_manifest
from rootfs._reference import Reference, parse_reference, validate_digest
from rootfs.errors import DigestError, ImageFormatError, ImageNotFoundError, RootfsError

_CHUNK = 1 << 20


class BlobDir:
    """Verified blobs by digest plus reference tags under ``home``.

    Example::

        >>> import tempfile
        >>> BlobDir(Path(tempfile.mkdtemp())).has_blob("sha256:" + "0" * 64)
        False
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        for sub in ("blobs/sha256", "refs", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)

    # -- blobs ---------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        """Where blob ``digest`` lives (it may not exist).

        Example::

            store.blob_path(img.layers[0].digest)
        """
        algo, _, hexpart = validate_digest(digest).partition(":")
        return self.home / "blobs" / algo / hexpart

    def has_blob(self, digest: str) -> bool:
        """Whether blob ``digest`` is stored.

        Example::

            store.has_blob(img.config_digest)
        """
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str) -> bytes:
        """The bytes of a stored blob (raises ImageNotFoundError).

        Example::

            json.loads(store.read_blob(img.digest))
        """
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageNotFoundError(f"blob {digest} is not in the store") from None

    def put_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (verified against ``digest`` if given); return its digest.

        Example::

            d = store.put_blob(b"{}")
        """
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and digest != got:
            raise DigestError(f"blob digest mismatch: expected {digest}, got {got}")
        path = self.blob_path(got)
        if not path.exists():
            atomic_write(path, data, 0o444, tmp_dir=self.home / "tmp")
        return got

    def put_blob_stream(self, src: BinaryIO, digest: str | None = None) -> str:
        """Store what ``src`` yields, hashed while copied (verified against ``digest``).

        Example::

            with open("layer.tar.gz", "rb") as f:
                store.put_blob_stream(f)
        """
        if digest is not None:
            validate_digest(digest)
            if self.has_blob(digest):
                return digest
        sha = hashlib.sha256()

        def final() -> Path:
            got = "sha256:" + sha.hexdigest()
            if digest is not None and digest != got:
                raise DigestError(f"blob digest mismatch: expected {digest}, got {got}")
            return self.blob_path(got)

        with atomic_replace(final, 0o444, tmp_dir=self.home / "tmp", prefix="blob-") as tmp, \
                open(tmp, "wb") as out:
            while chunk := src.read(_CHUNK):
                sha.update(chunk)
                out.write(chunk)
        return "sha256:" + sha.hexdigest()

    def put_blob_file(self, src: Path, digest: str | None = None) -> str:
        """Copy a file into the blob store after hashing it; return its digest.

        Example::

            store.put_blob_file(Path("layer.tar.gz"))
        """
        with open(src, "rb") as f:
            return self.put_blob_stream(f, digest)

    # -- refs ----------------------------------------------------------------
    def _ref_path(self, ref: Reference) -> Path:
        key = hashlib.sha256(str(ref).encode()).hexdigest()[:40]
        return self.home / "refs" / f"{key}.json"

    def tag(self, ref: str | Reference, manifest_digest: str) -> Image:
        """Point ``ref`` at a stored manifest; return the image.

        Example::

            store.tag("local/app:stable", img.digest)
        """
        r = parse_reference(ref) if isinstance(ref, str) else ref
        img = self.image_from_manifest(str(r), manifest_digest)
        record = {"ref": str(r), "digest": manifest_digest, "time": time.time()}
        atomic_write(self._ref_path(r), json.dumps(record).encode(), tmp_dir=self.home / "tmp")
        return img

    def image_from_manifest(self, ref: str, digest: str) -> Image:
        """The :class:`Image` of stored manifest ``digest`` named ``ref``.

        Example::

            store.image_from_manifest("local/app:1", img.digest) == img
        """
        body = self.read_blob(digest)
        config_desc, layers = parse_manifest(body, f"manifest {digest}")
        config_bytes = self.read_blob(config_desc.digest)
        diff_ids = parse_config(config_bytes, len(layers), f"config {config_desc.digest}")
        cfg = parse_json(config_bytes, "config")
        return Image(ref, digest, config_desc.digest, layers, diff_ids, cfg)

    def lookup(self, r: Reference) -> Image | None:
        """The stored image for ``r`` (by tag, or by digest), or None.

        Example::

            store.lookup(parse_reference("busybox:test"))
        """
        path = self._ref_path(r)
        if path.exists():
            rec = json.loads(path.read_text())
            return self.image_from_manifest(str(r), rec["digest"])
        if r.digest is not None and self.has_blob(r.digest):
            try:
                return self.image_from_manifest(str(r), r.digest)
            except ImageFormatError:
                return None  # an index: needs a platform resolution via pull
        return None

    def get(self, ref: str | Image) -> Image:
        """The stored image for ``ref`` (raises :class:`ImageNotFoundError`).

        Example::

            img = store.get("busybox:test")
        """
        if isinstance(ref, Image):
            return ref
        r = parse_reference(ref)
        img = self.lookup(r)
        if img is None:
            raise ImageNotFoundError(f"image {str(r)!r} is not in the store (pull or load it)")
        return img

    def list(self) -> builtins.list[Image]:
        """Every tagged image, sorted by reference.

        Example::

            for img in store.list(): print(img.ref, img.digest)
        """
        out = []
        for p in sorted((self.home / "refs").glob("*.json")):
            try:
                rec = json.loads(p.read_text())
                out.append(self.image_from_manifest(rec["ref"], rec["digest"]))
            except (OSError, ValueError, KeyError, RootfsError):
                continue
        return sorted(out, key=lambda i: i.ref)

    def remove(self, ref: str | Image) -> None:
        """Untag ``ref`` (content goes at the next prune).

        Example::

            store.remove("busybox:test")
        """
        name = ref.ref if isinstance(ref, Image) else ref
        r = parse_reference(name)
        path = self._ref_path(r)
        if not path.exists():
            raise ImageNotFoundError(f"image {str(r)!r} is not in the store")
        path.unlink()
