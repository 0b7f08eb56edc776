"""The image store: the public facade over pulling, importing, unpacking, preparing, pruning.

Layout under ``home`` (default ``$MICROVM_HOME/images``)::

    blobs/sha256/<hex>        manifests, configs and compressed layers (verified)
    refs/<key>.json           reference -> manifest digest
    rootfs/<config-hex>/      flattened root tree (built once, read-only use)
    disks/<config-hex>.erofs  read-only image disk shared by every sandbox
    prepared/<id>/meta.json   one prepared root: its image, owner and upper disk
    prepared/<id>/upper.ext4  its upper disk (patches baked in) when no ``dest`` was given
    locks/, tmp/

One module per job, :class:`ImageStore` ties them together:

* :mod:`rootfs._blobs` -- blobs and tags (``put_blob``, ``tag``, ``get``, ``list``);
* :mod:`rootfs._pull` -- registry pulls (``pull``);
* :mod:`rootfs._layout` -- OCI layouts and docker archives (``load``, ``save``);
* :mod:`rootfs._prepare` -- trees, image disks, prepared roots (``unpack``,
  ``rootfs_dir``, ``image_disk``, ``prepare``), unpacking through a
  :class:`~rootfs.protocols.Unpacker` (ours by default, or umoci);
* :mod:`rootfs._prune` -- garbage collection (``prune``).

Prepared roots have an owner and a lifetime: with ``dest`` the owner is that
directory (the root lives while it exists); without, it is the process that called
:meth:`ImageStore.prepare` (pid + start time from ``/proc/PID/stat``).
:meth:`PreparedRoot.remove` frees one at once; :meth:`ImageStore.prune` frees every
prepared root whose owner is gone, then the image content nothing uses any more.

Files are published with one atomic, fsynced write (:func:`rootfs._fs.atomic_replace`);
file locks make concurrent pulls of the same image share the work.

Example::

    store = ImageStore()
    img = store.pull("127.0.0.1:5000/busybox:latest", insecure=True)
    root = store.prepare(img, patches=[Patch.text("/etc/motd", "hi\\n")])
    print(root.mount_plan())
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from rootfs._blobs import BlobDir
from rootfs._disks import PreparedRoot
from rootfs._fs import microvm_home
from rootfs._image import Image, host_platform
from rootfs._patches import Patch
from rootfs._prepare import image_disk, prepare_root, rootfs_tree, unpack_image
from rootfs._prune import PruneResult, prune_store
from rootfs._pull import POLICIES, PullPolicy, pull_image
from rootfs._reference import parse_reference
from rootfs._registry import CaCerts, ProgressFn, RegistryAuth, RegistryClient
from rootfs._unpack import NativeUnpacker, UnpackLimits, UnpackState
from rootfs.errors import DiskError, ImageNotFoundError, RootfsError
from rootfs.protocols import Unpacker

__all__ = ["ImageStore", "PruneResult", "PullPolicy", "host_platform"]

_UNPACKERS = ("native", "umoci")


def _unpacker(choice: Unpacker | str) -> Unpacker:
    if choice == "native":
        return NativeUnpacker()
    if choice == "umoci":
        from rootfs._umoci import UmociUnpacker

        return UmociUnpacker()
    if isinstance(choice, str) or not isinstance(choice, Unpacker):
        raise RootfsError(f"unpacker={choice!r}: use one of {', '.join(_UNPACKERS)} or an "
                          "Unpacker instance")
    return choice


class ImageStore(BlobDir):
    """Images on local disk; see the module docstring for the layout.

    ``unpacker``: ``"native"`` (default: our extractor), ``"umoci"`` (``umoci raw
    unpack`` per layer, then our whiteout and safety checks) or any
    :class:`~rootfs.protocols.Unpacker`.

    Example::

        >>> import rootfs
        >>> Path("src/etc").mkdir(parents=True)
        >>> _ = Path("src/etc/motd").write_text("hi\\n")
        >>> store = rootfs.ImageStore(Path("images"))
        >>> img = rootfs.build_image(Path("src"), "local/app:1", store)
        >>> store.get("local/app:1") == img, [i.ref for i in store.list()]
        (True, ['docker.io/local/app:1'])
    """

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 *, limits: UnpackLimits | None = None,
                 staging_dir: str | os.PathLike[str] | Literal["auto"] | None = "auto",
                 unpacker: Unpacker | Literal["native", "umoci"] = "native") -> None:
        self.unpacker = _unpacker(unpacker)
        root = (Path(home) if home is not None else microvm_home() / "images").absolute()
        self.limits = limits or UnpackLimits()
        # Patches are staged in RAM (tmpfs) before mkfs.ext4 -d copies them into the upper
        # disk: faster than a busy disk. None stages next to the upper disk.
        self.staging_dir: Path | None = None
        if staging_dir == "auto":
            shm = Path("/dev/shm")
            if shm.is_dir() and os.access(shm, os.W_OK):
                self.staging_dir = shm
        elif staging_dir is not None:
            self.staging_dir = Path(staging_dir)
        try:
            super().__init__(root)
            for sub in ("rootfs", "disks", "prepared", "locks"):
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RootfsError(_home_problem(root, home is None, exc)) from None

    # -- pull ----------------------------------------------------------------
    def pull(
        self,
        ref: str,
        *,
        auth: RegistryAuth | tuple[str, str] | None = None,
        insecure: bool = False,
        ca_certs: CaCerts | None = None,
        policy: PullPolicy = "if-missing",
        progress: ProgressFn | None = None,
        platform: str | None = None,
        max_workers: int = 4,
    ) -> Image:
        """Fetch ``ref`` from its registry (registry v2), verifying every digest.

        ``policy``: ``if-missing`` (default) uses a stored image, ``always``
        refreshes the manifest (reusing stored layers), ``never`` only looks locally.
        ``progress(layer_digest, done, total)`` is called as bytes arrive.

        Example::

            img = store.pull("registry.test:5443/app:1", ca_certs="ca.pem",
                             auth=RegistryAuth("u", "p"))
        """
        if policy not in POLICIES:
            raise RootfsError(f"bad pull policy {policy!r}: use one of {', '.join(POLICIES)}")
        r = parse_reference(ref)
        if policy != "always":
            found = self.lookup(r)
            if found is not None:
                return found
            if policy == "never":
                raise ImageNotFoundError(f"image {str(r)!r} is not in the store (policy=never)")
        client = RegistryClient(r.registry, api_host=r.api_host, auth=auth, insecure=insecure,
                                ca_certs=ca_certs)
        try:
            return pull_image(self, r, client=client, policy=policy,
                              platform=platform or host_platform(), progress=progress,
                              max_workers=max_workers)
        finally:
            client.close()

    # -- load / save ---------------------------------------------------------
    def load(self, path: str | os.PathLike[str], ref: str | None = None) -> builtins.list[Image]:
        """Import an OCI layout (directory or tarball) or a ``docker save`` archive.

        Images are tagged with their annotated/RepoTags names, or ``ref`` if given.

        Example::

            [img] = store.load("busybox-oci.tar", ref="local/busybox:1")
        """
        from rootfs._layout import load_archive

        return load_archive(self, Path(path), ref)

    def save(self, refs: str | Image | Iterable[str | Image],
             dest: str | os.PathLike[str]) -> Path:
        """Export images as an OCI layout: a directory, or a tarball if ``dest`` ends in .tar.

        Each image is annotated with its full reference, so :meth:`load` restores the tags.

        Example::

            store.save("local/busybox:latest", "/tmp/busybox.tar")
        """
        from rootfs._layout import save_archive

        items = [refs] if isinstance(refs, (str, Image)) else list(refs)
        images = [self.get(r) for r in items]
        return save_archive(self, images, Path(dest), self.home / "tmp")

    # -- unpack --------------------------------------------------------------
    def unpack(self, image: Image | str, dest: str | os.PathLike[str],
               *, limits: UnpackLimits | None = None) -> UnpackState:
        """Flatten the image's layers into ``dest`` (must be absent or empty).

        Whiteouts/opaque dirs applied; hardlinks, symlinks, modes, xattrs and (as
        root) ownership kept. Hostile layers raise :class:`UnsafeLayerError`.

        Example::

            store.unpack(img, "/tmp/busybox-root")
        """
        img = self.get(image)
        return unpack_image(self, img, Path(dest), unpacker=self.unpacker,
                            limits=limits or self.limits)

    def rootfs_dir(self, image: Image | str) -> Path:
        """The store's cached flattened tree of ``image`` (built on first use).

        Example::

            (store.rootfs_dir(img) / "bin" / "busybox").exists()
        """
        return rootfs_tree(self, self.get(image), unpacker=self.unpacker, limits=self.limits)

    def image_disk(self, image: Image | str, fmt: Literal["erofs", "ext4"] = "erofs") -> Path:
        """The read-only image disk for ``image`` (built once per image id, then shared).

        Example::

            store.image_disk(img)  # .../disks/<hex>.erofs
        """
        if fmt not in ("erofs", "ext4"):
            raise DiskError(f"image disk format {fmt!r} not supported: use 'erofs' or 'ext4'")
        img = self.get(image)
        return image_disk(self, img, fmt, lambda: self.rootfs_dir(img))

    # -- prepare -------------------------------------------------------------
    def prepare(
        self,
        image: Image | str,
        *,
        patches: Iterable[Patch] = (),
        upper_size_mib: int = 4096,
        image_format: Literal["erofs", "ext4"] = "erofs",
        dest: str | os.PathLike[str] | None = None,
    ) -> PreparedRoot:
        """Image disk (shared, cached) + a fresh sparse ext4 upper disk with patches baked in.

        The upper disk's root holds ``upper/`` (overlay upperdir) and ``work/``.
        ``dest`` is the per-sandbox directory (default ``prepared/<random id>``).

        Lifetime: call :meth:`PreparedRoot.remove` when done. Otherwise the root lives
        while its owner does: the ``dest`` directory if given, else the calling process
        (its pid and start time are recorded); :meth:`prune` frees the rest.

        Example::

            root = store.prepare(img, patches=[Patch.remove("/etc/motd")], upper_size_mib=512)
            root.mount_plan()["upper"]["disk"]
            root.remove()
        """
        img = self.get(image)
        if isinstance(upper_size_mib, bool) or not isinstance(upper_size_mib, int) \
                or not 8 <= upper_size_mib <= (1 << 24):
            raise DiskError(f"upper_size_mib={upper_size_mib!r}: must be an int in 8..16777216")
        disk = self.image_disk(img, image_format)
        lower = self.rootfs_dir(img)
        return prepare_root(self, img, patches=patches, upper_size_mib=upper_size_mib,
                            image_format=image_format, disk=disk, lower=lower, dest=dest,
                            staging_dir=self.staging_dir)

    # -- prune ---------------------------------------------------------------
    def prune(self, *, grace_seconds: float = 600.0) -> PruneResult:
        """Free prepared roots whose owner is gone, then the blobs, trees and disks no
        tag or remaining prepared root uses.

        A prepared root's owner is its ``dest`` directory (gone = removed) or, without
        ``dest``, the process that prepared it (gone = that pid no longer runs with the
        recorded start time). Records from before owners were recorded count as gone
        once older than ``grace_seconds``. Content younger than ``grace_seconds`` is
        kept, so a pull or load running in another process (blobs stored, tag not yet
        written) is never pruned.

        Example::

            store.remove("busybox:old"); store.prune(grace_seconds=0)
        """
        return prune_store(self, grace_seconds=grace_seconds)


def _home_problem(home: Path, default: bool, exc: OSError) -> str:
    """One line saying why the store directory ``home`` cannot be used."""
    env = os.environ.get("MICROVM_HOME")
    src = f" (from MICROVM_HOME={env!r})" if default and env else ""
    for p in (home, *home.parents):
        if p.is_symlink() or p.exists():
            if not p.is_dir():
                return (f"cannot use image store {str(home)!r}{src}: {str(p)!r} is not a "
                        "directory")
            break
    return f"cannot use image store {str(home)!r}{src}: {exc.strerror or exc}"
