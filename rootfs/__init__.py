"""rootfs: OCI images to guest root disks, with patches.

Never imports ``netstack``, ``tls_proxy`` or ``microvm``.
"""

from rootfs.errors import RootfsError

__all__ = ["RootfsError"]
