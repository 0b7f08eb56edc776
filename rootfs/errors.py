"""Exceptions raised by :mod:`rootfs`; all derive from :class:`RootfsError`.

>>> import rootfs
>>> try:
...     rootfs.parse_reference("Bad Ref")
... except rootfs.RootfsError as exc:
...     print(type(exc).__name__)
InvalidReferenceError
"""

from __future__ import annotations


class RootfsError(Exception):
    """Base class of every error raised by rootfs.

    >>> import rootfs
    >>> try:
    ...     rootfs.ImageStore("store").get("never/pulled:1")
    ... except RootfsError as exc:
    ...     print(exc)
    image 'docker.io/never/pulled:1' is not in the store (pull or load it)
    """


class InvalidReferenceError(RootfsError, ValueError):
    """An image reference could not be parsed; the message names the bad part.

    >>> import rootfs
    >>> rootfs.parse_reference("Bad Ref")
    Traceback (most recent call last):
    ...
    rootfs.errors.InvalidReferenceError: bad repository component 'Bad Ref' in image reference 'Bad Ref': ...
    """


class DigestError(RootfsError, ValueError):
    """A digest string is malformed or content does not match its digest.

    >>> import rootfs
    >>> rootfs.ImageStore("store").put_blob(b"x", "sha256:" + "0" * 64)
    Traceback (most recent call last):
    ...
    rootfs.errors.DigestError: blob digest mismatch: expected sha256:000..., got sha256:2d7116...
    """


class RegistryError(RootfsError):
    """A registry request failed (HTTP error, bad manifest, network failure).

    ``cli_message`` is the same message with its hints spelled as ``python -m rootfs``
    options (``--insecure``) instead of API arguments (``insecure=True``).

    >>> e = RegistryError("HTTP 404 from 127.0.0.1:5000 (insecure=True?)",
    ...                   cli_message="HTTP 404 from 127.0.0.1:5000 (--insecure?)")
    >>> e.cli_message
    'HTTP 404 from 127.0.0.1:5000 (--insecure?)'
    >>> store.pull("127.0.0.1:1/none:1", insecure=True)  # doctest: +SKIP
    Traceback (most recent call last):
    rootfs.errors.RegistryError: ...
    """

    def __init__(self, message: str, *, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message if cli_message is not None else message


class AuthError(RegistryError):
    """The registry refused our credentials (HTTP 401/403).

    >>> issubclass(AuthError, RegistryError)
    True
    >>> store.pull(ref, auth=("alice", "wrong"))  # doctest: +SKIP
    Traceback (most recent call last):
    rootfs.errors.AuthError: ...
    """


class ImageNotFoundError(RootfsError, LookupError):
    """The image is not in the store (or not in the registry).

    >>> import rootfs
    >>> rootfs.ImageStore("store").get("never/pulled:1")
    Traceback (most recent call last):
    ...
    rootfs.errors.ImageNotFoundError: image 'docker.io/never/pulled:1' is not in the store (pull or load it)
    """


class ImageFormatError(RootfsError, ValueError):
    """An image manifest, config, layout or archive is malformed or unsupported.

    >>> import rootfs
    >>> from pathlib import Path
    >>> _ = Path("not-an-image.tar").write_bytes(b"junk")
    >>> rootfs.ImageStore("store").load(Path("not-an-image.tar"))
    Traceback (most recent call last):
    ...
    rootfs.errors.ImageFormatError: 'not-an-image.tar' is not a tar archive: ...
    """


class UnsafeLayerError(RootfsError):
    """A layer tries to escape the destination or breaks a limit; names the entry.

    >>> exc = UnsafeLayerError("../etc/passwd", "escapes the root")
    >>> exc.entry, str(exc)
    ('../etc/passwd', "unsafe layer entry '../etc/passwd': escapes the root")
    """

    def __init__(self, entry: str, reason: str) -> None:
        super().__init__(f"unsafe layer entry {entry!r}: {reason}")
        self.entry = entry
        self.reason = reason


class PatchError(RootfsError, ValueError):
    """A patch is invalid or cannot be applied; names the patch kind and path.

    >>> from rootfs import Patch
    >>> Patch.text("relative/path", "x")
    Traceback (most recent call last):
    ...
    rootfs.errors.PatchError: text patch: path 'relative/path' must be absolute and normalised ...
    """


class DiskError(RootfsError):
    """Building, detecting or preparing a guest disk failed.

    >>> from rootfs import prepare_disk_root
    >>> prepare_disk_root("/missing.qcow2")
    Traceback (most recent call last):
    ...
    rootfs.errors.DiskError: disk image '/missing.qcow2' does not exist or is not a file
    """
