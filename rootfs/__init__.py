"""rootfs: OCI images to guest root disks, with patches.

Pull (registry v2, token/basic auth, custom CAs), a content-addressed store,
safe layer unpacking, rootfs patches, and the disks a microVM boots from.
Never imports ``netstack``, ``tls_proxy`` or ``microvm``.

Modules, one job each: ``store`` (the :class:`ImageStore` facade) over ``_blobs``
(blobs and tags), ``_pull`` (registry pulls; HTTP in ``registry``), ``layout`` (OCI
layouts and docker archives, against the ``BlobStore`` protocol), ``_prepare`` (trees,
image disks, prepared roots), ``_prune`` (garbage collection); ``image`` (the OCI model,
platform choice), ``unpack`` (our layer extractor, the default ``Unpacker``) and
``umoci`` (the reference one), ``patches``, ``disks``, ``build``; the seams
(``RootProvider``, ``BlobStore``, ``Unpacker``) in ``protocols``.

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

# Everything but the errors is imported on first use: ``rootfs._fs`` (what microvm's
# supervisor and CLI need) stays cheap. Type checkers see the real names.
if TYPE_CHECKING:
    from rootfs.build import build_image, image_from_layers
    from rootfs.disks import PreparedRoot, prepare_bind_root, prepare_disk_root
    from rootfs.image import Descriptor, Image
    from rootfs.layout import load_archive, write_oci_layout
    from rootfs.patches import Patch, apply_patches
    from rootfs.protocols import BlobStore, RootProvider, Unpacker
    from rootfs.reference import Reference, parse_reference
    from rootfs.registry import RegistryAuth, RegistryClient
    from rootfs.store import ImageStore, PruneResult
    from rootfs.umoci import UmociUnpacker
    from rootfs.unpack import NativeUnpacker, UnpackLimits, UnpackState, apply_layer

_LAZY = {
    "build_image": "rootfs.build",
    "image_from_layers": "rootfs.build",
    "PreparedRoot": "rootfs.disks",
    "prepare_bind_root": "rootfs.disks",
    "prepare_disk_root": "rootfs.disks",
    "Descriptor": "rootfs.image",
    "Image": "rootfs.image",
    "load_archive": "rootfs.layout",
    "write_oci_layout": "rootfs.layout",
    "Patch": "rootfs.patches",
    "apply_patches": "rootfs.patches",
    "RootProvider": "rootfs.protocols",
    "BlobStore": "rootfs.protocols",
    "Unpacker": "rootfs.protocols",
    "Reference": "rootfs.reference",
    "parse_reference": "rootfs.reference",
    "RegistryAuth": "rootfs.registry",
    "RegistryClient": "rootfs.registry",
    "ImageStore": "rootfs.store",
    "PruneResult": "rootfs.store",
    "UmociUnpacker": "rootfs.umoci",
    "NativeUnpacker": "rootfs.unpack",
    "UnpackLimits": "rootfs.unpack",
    "UnpackState": "rootfs.unpack",
    "apply_layer": "rootfs.unpack",
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
    "build_image",
    "image_from_layers",
    "load_archive",
    "parse_reference",
    "prepare_bind_root",
    "prepare_disk_root",
    "write_oci_layout",
]
