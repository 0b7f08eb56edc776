"""rootfs: OCI images to guest root disks, with patches.

Pull (registry v2, token/basic auth, custom CAs), a content-addressed store,
safe layer unpacking, rootfs patches, and the disks a microVM boots from.
Never imports ``netstack``, ``tls_proxy`` or ``microvm``.

Example::

    import rootfs
    store = rootfs.ImageStore()                      # $MICROVM_HOME/images
    img = rootfs.build_image("/tmp/bb-root", "local/busybox:latest", store,
                             config={"Cmd": ["/bin/sh"]})
    root = store.prepare(img, patches=[rootfs.Patch.text("/etc/motd", "hi\\n")])
    root.mount_plan()   # {"kind": "overlay", "lower": [...], "upper": {...}}
"""

from rootfs.build import build_image, image_from_layers
from rootfs.disks import PreparedRoot, prepare_bind_root, prepare_disk_root
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
from rootfs.image import Descriptor, Image
from rootfs.layout import load_archive, write_oci_layout
from rootfs.patches import Patch, apply_patches
from rootfs.protocols import RootProvider
from rootfs.reference import Reference, parse_reference
from rootfs.registry import RegistryAuth, RegistryClient
from rootfs.store import ImageStore, PruneResult
from rootfs.unpack import UnpackLimits, UnpackState, apply_layer

__all__ = [
    "AuthError",
    "Descriptor",
    "DigestError",
    "DiskError",
    "Image",
    "ImageFormatError",
    "ImageNotFoundError",
    "ImageStore",
    "InvalidReferenceError",
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
    "UnpackLimits",
    "UnpackState",
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
