"""Exceptions raised by :mod:`rootfs`; all derive from :class:`RootfsError`.

Example::

    try:
        rootfs.parse_reference("Bad Ref")
    except rootfs.RootfsError as exc:
        print(exc)
"""

from __future__ import annotations


class RootfsError(Exception):
    """Base class of every error raised by rootfs.

    Example::

        except rootfs.RootfsError as exc: print(exc)
    """


class InvalidReferenceError(RootfsError, ValueError):
    """An image reference could not be parsed; the message names the bad part.

    Example::

        rootfs.parse_reference("Bad")  # raises, naming 'Bad'
    """


class DigestError(RootfsError, ValueError):
    """A digest string is malformed or content does not match its digest.

    Example::

        store.put_blob(b"x", "sha256:" + "0" * 64)  # raises
    """


class RegistryError(RootfsError):
    """A registry request failed (HTTP error, bad manifest, network failure).

    ``cli_message`` is the same message with its hints spelled as ``python -m rootfs``
    options (``--insecure``) instead of API arguments (``insecure=True``).

    Example::

        store.pull("127.0.0.1:1/none:1", insecure=True)  # raises
    """

    def __init__(self, message: str, *, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message if cli_message is not None else message


class AuthError(RegistryError):
    """The registry refused our credentials (HTTP 401/403).

    Example::

        store.pull(ref, auth=("alice", "wrong"))  # raises
    """


class ImageNotFoundError(RootfsError, LookupError):
    """The image is not in the store (or not in the registry).

    Example::

        store.get("never/pulled:1")  # raises
    """


class ImageFormatError(RootfsError, ValueError):
    """An image manifest, config, layout or archive is malformed or unsupported.

    Example::

        store.load(Path("not-an-image.tar"))  # raises
    """


class UnsafeLayerError(RootfsError):
    """A layer tries to escape the destination or breaks a limit; names the entry.

    Example::

        exc.entry  # the tar member name, e.g. "../etc/passwd"
    """

    def __init__(self, entry: str, reason: str) -> None:
        super().__init__(f"unsafe layer entry {entry!r}: {reason}")
        self.entry = entry
        self.reason = reason


class PatchError(RootfsError, ValueError):
    """A patch is invalid or cannot be applied; names the patch kind and path.

    Example::

        Patch.text("relative/path", "x")  # raises
    """


class DiskError(RootfsError):
    """Building, detecting or preparing a guest disk failed.

    Example::

        prepare_disk_root("/missing.qcow2")  # raises
    """
