"""Temporary run directories that record their owner, so a dead owner's leftovers can be swept.

A process killed with SIGKILL (or any death that skips its cleanup) leaves its
temporary directory behind: for ``microvm vm run`` that is a root disk image of
tens of MiB. Every directory made by :func:`owned_tempdir` holds a small
``.owner`` file with the creating process's pid and kernel start time;
:func:`sweep_stale` removes the directories whose owner is gone (the pid does not
exist, or now belongs to a different process).

Example::

    from microvm.backends._rundir import owned_tempdir, remove_owned, sweep_stale
    sweep_stale()                       # leftovers of dead processes
    d = owned_tempdir("microvm-run-")
    try:
        ...
    finally:
        remove_owned(d)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["OWNER_FILE", "owned_tempdir", "owner_alive", "remove_owned", "sweep_stale"]

OWNER_FILE = ".owner"
DEFAULT_PREFIX = "microvm-"


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # fields[0] is field 3 (state); the start time is field 22
    return fields[19] if len(fields) > 19 else None


def owned_tempdir(prefix: str = DEFAULT_PREFIX, parent: Path | None = None) -> Path:
    """Create a private temporary directory recording this process as its owner.

    ``prefix`` must start with ``microvm-`` so :func:`sweep_stale` finds it.

    Example::

        d = owned_tempdir("microvm-run-")
        (d / ".owner").read_text()   # '12345 987654\\n'
    """
    if not prefix.startswith(DEFAULT_PREFIX):
        raise ValueError(f"bad prefix {prefix!r}: it must start with {DEFAULT_PREFIX!r}")
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    pid = os.getpid()
    (d / OWNER_FILE).write_text(f"{pid} {_start_time(pid) or '?'}\n")
    return d


def owner_alive(d: Path) -> bool | None:
    """True if ``d``'s owner still runs, False if it is gone, None if ``d`` has no owner record.

    Example::

        owner_alive(owned_tempdir())  # True
    """
    try:
        pid_s, _, start = (d / OWNER_FILE).read_text().strip().partition(" ")
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    now = _start_time(pid)
    if now is None:
        return False
    return start in ("?", now)


def remove_owned(d: Path) -> None:
    """Remove a directory made by :func:`owned_tempdir` (idempotent, never raises).

    Example::

        remove_owned(d)
    """
    shutil.rmtree(d, ignore_errors=True)


def sweep_stale(parent: Path | None = None, prefix: str = DEFAULT_PREFIX) -> list[Path]:
    """Remove the ``prefix*`` directories in ``parent`` (the temp dir) whose owner is dead.

    Directories without an owner record, or owned by another user, are left alone.
    Returns the directories removed.

    Example::

        for d in sweep_stale():
            print("removed leftover", d)
    """
    base = Path(parent or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    uid = os.geteuid()
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        with contextlib.suppress(OSError):
            if not e.is_dir(follow_symlinks=False) or e.stat(follow_symlinks=False).st_uid != uid:
                continue
            d = Path(e.path)
            if owner_alive(d) is False:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed
