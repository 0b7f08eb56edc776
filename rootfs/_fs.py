"""Small filesystem helpers: atomic writes, lock files, home directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from filelock import FileLock


def microvm_home() -> Path:
    """``$MICROVM_HOME`` or ``~/.microvm``."""
    env = os.environ.get("MICROVM_HOME")
    return Path(env) if env else Path.home() / ".microvm"


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks since boot, ``/proc/PID/stat`` field 22),
    or None when there is no such process. With the pid it names one process for good:
    a recycled pid has another start time.

    Example::

        >>> process_start_time(os.getpid()) is not None
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
    """A process-shared lock file ``locks_dir/name.lock``."""
    locks_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks_dir / f"{name}.lock"), timeout=timeout)
