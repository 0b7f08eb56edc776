"""The seam ``microvm`` uses: anything that turns an image into a :class:`PreparedRoot`.

Example::

    def boot(provider: RootProvider, image: str) -> None:
        root = provider.prepare(image, patches=[Patch.mkdir("/data")], upper_size_mib=1024)
        plan = root.mount_plan()   # hand to the guest agent
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from rootfs.disks import PreparedRoot
from rootfs.image import Image
from rootfs.patches import Patch


@runtime_checkable
class RootProvider(Protocol):
    """What a VMM needs from a rootfs layer; :class:`~rootfs.ImageStore` implements it.

    Example::

        assert isinstance(rootfs.ImageStore(), RootProvider)
    """

    def prepare(
        self, image: Image | str, *, patches: Iterable[Patch] = ..., upper_size_mib: int = ...
    ) -> PreparedRoot:
        """Disks (or a directory) plus the guest mount plan for ``image``."""
        ...
