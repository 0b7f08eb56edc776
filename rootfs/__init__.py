"""rootfs: OCI images to guest root disks, with patches.

Pull (registry v2, token/basic auth, custom CAs), a content-addressed store,
safe layer unpacking, rootfs patches, and the disks a microVM boots from.
Never imports ``netstack``, ``tls_proxy`` or ``microvm``.

Public: this package's exports, ``rootfs.errors``, the seams in ``rootfs.protocols``
(``RootProvider``, ``BlobStore``, ``Unpacker``), ``rootfs.cli`` (the ``rootfs`` command)
and ``python -m rootfs``. Everything else is private, one job per module: ``_store``
(the :class:`ImageStore` facade) over ``_blobs`` (blobs and tags), ``_pull`` (registry
pulls; HTTP in ``_registry``/``_registry_http``), ``_layout`` (OCI layouts and docker
archives, against the ``BlobStore`` protocol), ``_prepare`` (trees, image disks,
prepared roots), ``_prune`` (garbage collection); ``_image`` (the OCI model, platform
choice), ``_reference``, ``_unpack`` (our layer extractor, the default ``Unpacker``) and
``_umoci`` (the reference one), ``_patches``, ``_disks``, ``_build``, ``_walk``;
``_fs`` (the one atomic write, locks, ``microvm_home``, also exported for microvm).

Example::

    import rootfs
    store = rootfs.ImageStore()                      # $MICROVM_HOME/images
    img = rootfs.build_image("/tmp/bb-root", "local/busybox:latest", store,
                             config={"Cmd": ["/bin/sh"]})
    root = store.prepare(img, patches=[rootfs.Patch.text("/etc/motd", "hi\\n")])
    root.mount_plan()   # {"kind": "overlay", "lower": [...], "upper": {...}}
"""

from typing import TYPE_CHECKING

from rootfs.errors import (
    AuthError,
    DigestError,
    DiskError,
    ImageFormatError,
    ImageNotFoundError,
    InvalidReferenceError,
    PatchError,
    RegistryError,
    RootfsError,
    UnsafeLayerError,
)

# Everything but the errors is imported on first use: ``import rootfs`` and the ``_fs``
# helpers (what microvm's supervisor and CLI need) stay cheap. Type checkers see the
# real names.
if TYPE_CHECKING:
    from rootfs._build import build_image, image_from_layers
    from rootfs._disks import PreparedRoot, prepare_bind_root, prepare_disk_root
    from rootfs._fs import atomic_write, microvm_home, process_start_time
    from rootfs._image import Descriptor, Image
    from rootfs._layout import load_archive, write_oci_layout
    from rootfs._patches import Patch, apply_patches
    from rootfs._reference import Reference, parse_reference
    from rootfs._registry import RegistryAuth, RegistryClient
    from rootfs._store import ImageStore, PruneResult
    from rootfs._umoci import UmociUnpacker
    from rootfs._unpack import NativeUnpacker, UnpackLimits, UnpackState, apply_layer
    from rootfs.protocols import BlobStore, RootProvider, Unpacker

_LAZY = {
    "build_image": "rootfs._build",
    "image_from_layers": "rootfs._build",
    "PreparedRoot": "rootfs._disks",
    "prepare_bind_root": "rootfs._disks",
    "prepare_disk_root": "rootfs._disks",
    "atomic_write": "rootfs._fs",
    "microvm_home": "rootfs._fs",
    "process_start_time": "rootfs._fs",
    "Descriptor": "rootfs._image",
    "Image": "rootfs._image",
    "load_archive": "rootfs._layout",
    "write_oci_layout": "rootfs._layout",
    "Patch": "rootfs._patches",
    "apply_patches": "rootfs._patches",
    "RootProvider": "rootfs.protocols",
    "BlobStore": "rootfs.protocols",
    "Unpacker": "rootfs.protocols",
    "Reference": "rootfs._reference",
    "parse_reference": "rootfs._reference",
    "RegistryAuth": "rootfs._registry",
    "RegistryClient": "rootfs._registry",
    "ImageStore": "rootfs._store",
    "PruneResult": "rootfs._store",
    "UmociUnpacker": "rootfs._umoci",
    "NativeUnpacker": "rootfs._unpack",
    "UnpackLimits": "rootfs._unpack",
    "UnpackState": "rootfs._unpack",
    "apply_layer": "rootfs._unpack",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rootfs' has no attribute {name!r}")


__all__ = [
    "AuthError",
    "BlobStore",
    "Descriptor",
    "DigestError",
    "DiskError",
    "Image",
    "ImageFormatError",
    "ImageNotFoundError",
    "ImageStore",
    "InvalidReferenceError",
    "NativeUnpacker",
    "Patch",
    "PatchError",
    "PreparedRoot",
    "PruneResult",
    "Reference",
    "RegistryAuth",
    "RegistryClient",
    "RegistryError",
    "RootProvider",
    "RootfsError",
    "UmociUnpacker",
    "UnpackLimits",
    "UnpackState",
    "Unpacker",
    "UnsafeLayerError",
    "apply_layer",
    "apply_patches",
    "atomic_write",
    "build_image",
    "image_from_layers",
    "load_archive",
    "microvm_home",
    "parse_reference",
    "prepare_bind_root",
    "prepare_disk_root",
    "process_start_time",
    "write_oci_layout",
]
