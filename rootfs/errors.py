"""Exceptions raised by :mod:`rootfs`; all derive from :class:`RootfsError`.

Example::

    try:
        rootfs.parse_reference("Bad Ref")
    except rootfs.RootfsError as exc:
        print(exc)
"""

from __future__ import annotations


class RootfsError(Exception):
    """Base class of every error raised by rootfs."""


class InvalidReferenceError(RootfsError, ValueError):
    """An image reference could not be parsed; the message names the bad part."""


class DigestError(RootfsError, ValueError):
    """A digest string is malformed or content does not match its digest."""


class RegistryError(RootfsError):
    """A registry request failed (HTTP error, bad manifest, network failure)."""


class AuthError(RegistryError):
    """The registry refused our credentials (HTTP 401/403)."""


class ImageNotFoundError(RootfsError, LookupError):
    """The image is not in the store (or not in the registry)."""


class ImageFormatError(RootfsError, ValueError):
    """An image manifest, config, layout or archive is malformed or unsupported."""


class UnsafeLayerError(RootfsError):
    """A layer tries to escape the destination or breaks a limit; names the entry."""

    def __init__(self, entry: str, reason: str) -> None:
        super().__init__(f"unsafe layer entry {entry!r}: {reason}")
        self.entry = entry
        self.reason = reason


class PatchError(RootfsError, ValueError):
    """A patch is invalid or cannot be applied; names the patch kind and path."""


class DiskError(RootfsError):
    """Building, detecting or preparing a guest disk failed."""
