"""The seams of rootfs: what ``microvm`` needs, what the layout code needs, what unpacks.

* :class:`RootProvider` turns an image into a :class:`PreparedRoot` (``microvm`` uses it);
  :class:`~rootfs.ImageStore` implements it.
* :class:`BlobStore` is the content-addressed store the OCI layout/archive code reads and
  writes (:mod:`rootfs._layout`); :class:`~rootfs.ImageStore` implements it.
* :class:`Unpacker` applies one layer blob onto a directory;
  :class:`~rootfs._unpack.NativeUnpacker` (ours, the default) and
  :class:`~rootfs._umoci.UmociUnpacker` implement it.

Example::

    def boot(provider: RootProvider, image: str) -> None:
        root = provider.prepare(image, patches=[Patch.mkdir("/data")], upper_size_mib=1024)
        plan = root.mount_plan()   # hand to the guest agent
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from rootfs._disks import PreparedRoot
from rootfs._image import Image
from rootfs._patches import Patch
from rootfs._reference import Reference
from rootfs._unpack import UnpackState


@runtime_checkable
class RootProvider(Protocol):
    """What a VMM needs from a rootfs layer; :class:`~rootfs.ImageStore` implements it.

    Example::

        >>> import rootfs
        >>> isinstance(rootfs.ImageStore(Path("images")), rootfs.RootProvider)
        True
    """

    def prepare(
        self, image: Image | str, *, patches: Iterable[Patch] = ..., upper_size_mib: int = ...
    ) -> PreparedRoot:
        """Disks (or a directory) plus the guest mount plan for ``image``."""
        ...


@runtime_checkable
class BlobStore(Protocol):
    """Verified blobs by digest plus tags: what importing/exporting OCI layouts needs.

    Example (``write_oci_layout(store, ...)`` takes any ``BlobStore``)::

        >>> import rootfs
        >>> store = rootfs.ImageStore(Path("images"))
        >>> isinstance(store, rootfs.BlobStore)
        True
        >>> digest = store.put_blob(b"{}")
        >>> store.has_blob(digest), store.read_blob(digest)
        (True, b'{}')
    """

    def blob_path(self, digest: str) -> Path:
        """Where blob ``digest`` lives (it may not exist)."""
        ...

    def has_blob(self, digest: str) -> bool:
        """Whether blob ``digest`` is stored."""
        ...

    def read_blob(self, digest: str) -> bytes:
        """The bytes of a stored blob (raises :class:`~rootfs.errors.ImageNotFoundError`)."""
        ...

    def put_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (verified against ``digest`` if given); return its digest."""
        ...

    def put_blob_stream(self, src: BinaryIO, digest: str | None = None) -> str:
        """Store what ``src`` yields (hashed while copied, verified); return its digest."""
        ...

    def tag(self, ref: str | Reference, manifest_digest: str) -> Image:
        """Point ``ref`` at a stored manifest; return the image."""
        ...


@runtime_checkable
class Unpacker(Protocol):
    """Applies one layer blob (gzip, zstd or plain tar) onto a directory.

    Implementations apply OCI whiteouts, refuse hostile layers with
    :class:`~rootfs.errors.UnsafeLayerError` (charging ``state``'s limits), check the
    uncompressed digest against ``expected_diff_id`` and return it.

    Example (``ImageStore(unpacker=...)`` takes one; ``"native"`` is the default)::

        >>> import rootfs
        >>> isinstance(rootfs.NativeUnpacker(), rootfs.Unpacker)
        True
        >>> rootfs.ImageStore(Path("images"), unpacker="umoci").unpacker.name
        'umoci'
    """

    name: str
    """Short name (``"native"``, ``"umoci"``)."""

    def apply(self, blob: Path, dest: Path, *, state: UnpackState,
              expected_diff_id: str | None = None) -> str:
        """Apply layer file ``blob`` onto ``dest``; return its diff_id."""
        ...
