"""Small filesystem helpers: the one atomic write, lock files, home directory.

Every file rootfs publishes (blobs, refs, records, image disks, saved archives, each
file of a saved layout directory) goes through :func:`atomic_replace` (or is a hard
link to a blob already published): written under a temporary name in a directory of the
same filesystem, fsynced, chmodded, renamed over the final name, and the directory
fsynced, so a crash leaves either the old file or the whole new one, never a torn one.
:func:`atomic_write`, :func:`microvm_home` and :func:`process_start_time` are public
(exported from :mod:`rootfs`, what ``microvm`` uses); the rest is rootfs's own.

Example::

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> atomic_write(d / "a.json", b"{}", 0o444)
    >>> (d / "a.json").read_bytes(), oct((d / "a.json").stat().st_mode & 0o777)
    (b'{}', '0o444')
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock


def microvm_home() -> Path:
    """``$MICROVM_HOME`` or ``~/.microvm``.

    Example::

        >>> import rootfs
        >>> isinstance(rootfs.microvm_home(), Path)
        True
    """
    env = os.environ.get("MICROVM_HOME")
    return Path(env) if env else Path.home() / ".microvm"


def fsync_dir(path: Path) -> None:
    """fsync directory ``path`` (makes a rename or unlink in it durable).

    Example::

        >>> fsync_dir(Path("/tmp"))
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_replace(path: Path | Callable[[], Path], mode: int = 0o644, *,
                   tmp_dir: Path | None = None, prefix: str = "",
                   durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to fill; on success it becomes ``path`` atomically.

    The temporary file is created empty in ``tmp_dir`` (default: ``path``'s directory;
    it must be on the same filesystem). When the block ends without an exception it is
    fsynced, given ``mode``, renamed over ``path`` and ``path``'s directory is fsynced;
    on an exception it is removed and ``path`` is untouched. ``path`` may be a
    callable (with ``tmp_dir``) when the name is known only from the contents, as a
    blob's digest is: it is called after the block. ``durable=False`` skips both
    fsyncs (still atomic, not crash-proof): for records that die with their process.

    Example::

        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with atomic_replace(d / "disk.img", 0o444) as tmp:
        ...     _ = tmp.write_bytes(b"\\0" * 512)
        >>> (d / "disk.img").stat().st_size
        512
    """
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        where, pre = tmp_dir or path.parent, prefix or f".{path.name}."
    elif tmp_dir is None:
        raise TypeError("atomic_replace: a callable path needs tmp_dir")
    else:
        where, pre = tmp_dir, prefix or ".tmp-"
    fd, name = tempfile.mkstemp(dir=where, prefix=pre)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, mode)
        final = path if isinstance(path, Path) else path()
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(final.parent)


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *,
                 tmp_dir: Path | None = None, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_replace`).

    Example::

        >>> import tempfile
        >>> from rootfs import atomic_write
        >>> p = Path(tempfile.mkdtemp()) / "ref.json"
        >>> atomic_write(p, b'{"digest": "x"}')
        >>> p.read_text()
        '{"digest": "x"}'
    """
    with atomic_replace(path, mode, tmp_dir=tmp_dir, durable=durable) as tmp, \
            open(tmp, "wb") as f:
        f.write(data)


def process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks since boot, ``/proc/PID/stat`` field 22),
    or None when there is no such process. With the pid it names one process for good:
    a recycled pid has another start time.

    Example::

        >>> from rootfs import process_start_time
        >>> process_start_time(os.getpid()) is not None
        True
        >>> process_start_time(2**22 + 1) is None    # above pid_max: no such process
        True
    """
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            data = f.read()
    except (OSError, ValueError):
        return None
    # the command name (field 2) is in parentheses and may itself contain ") "
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def lock(locks_dir: Path, name: str, timeout: float = 600.0) -> FileLock:
    """A process-shared lock file ``locks_dir/name.lock`` (a :class:`filelock.FileLock`).

    Example::

        >>> import tempfile
        >>> with lock(Path(tempfile.mkdtemp()), "blob-abc"):
        ...     pass
    """
    locks_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks_dir / f"{name}.lock"), timeout=timeout)
