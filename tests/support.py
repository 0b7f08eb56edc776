"""Shared test helpers: skip reasons for missing root, binaries or a bootable VMM; running
a program as an unprivileged user from a root test (:func:`unprivileged_argv`)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys

import pytest


def require_root() -> None:
    """Skip the calling test unless it runs as root (namespaces, TAPs, mounts)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TAP devices or mounts)")


def require_binaries(*names: str) -> None:
    """Skip the calling test unless every named executable is on PATH (or an absolute path exists)."""
    missing = [n for n in names if not (shutil.which(n) or (os.path.isabs(n) and os.path.exists(n)))]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (install with ./setup.sh)")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


#: the unprivileged identity tests drop to (Debian's nobody / nogroup)
NOBODY, NOGROUP = 65534, 65534


def _blocking_ancestor(path: str, uid: int, gid: int) -> str | None:
    """The topmost ancestor directory of ``path`` that ``uid``/``gid`` (no supplementary
    groups) cannot traverse, or None if it can reach ``path``."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    current = "/"
    for part in parts[:-1] if os.path.isfile(path) else parts:
        current = os.path.join(current, part)
        try:
            st = os.stat(current)
        except OSError:
            return None
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return current
    return None


def unprivileged_argv(argv: list[str], *, uid: int = NOBODY, gid: int = NOGROUP,
                      needs: tuple[str, ...] = ()) -> list[str]:
    """``argv`` wrapped to run as ``uid``/``gid`` (no supplementary groups, no
    capabilities), for a root test that must exercise an unprivileged user.

    Everything the program needs must be readable by that user. The interpreter here
    may live under a directory it cannot traverse (pyenv under ``/root``, mode 0700):
    the wrapper then runs it in a private mount namespace (``unshare -m``, still root)
    where a tmpfs (mode 0755) covers each such blocking directory and the needed paths
    under it (``sys.base_prefix``, ``sys.prefix``, and ``needs``) are bind-mounted back
    at their own paths, before ``setpriv`` drops to ``uid``/``gid``. The host's mounts
    and permissions are never touched; file descriptors pass through (``pass_fds``).

    >>> unprivileged_argv(["id", "-u"])[-3:]
    ['--', 'id', '-u']
    """
    wanted = [sys.base_prefix, sys.prefix, *needs]
    binds: dict[str, list[str]] = {}
    for path in wanted:
        top = _blocking_ancestor(path, uid, gid)
        if top is not None and path not in binds.setdefault(top, []):
            binds[top].append(os.path.abspath(path))
    drop = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--inh-caps=-all", "--"]
    if not binds:
        return [*drop, *argv]
    lines = ["set -e", "mount -t tmpfs -o mode=0700 unpriv-stage /mnt"]
    n = 0
    for top, paths in binds.items():
        for p in paths:
            lines.append(f"mkdir -p /mnt/{n} && mount --rbind {shlex.quote(p)} /mnt/{n}")
            n += 1
        lines.append(f"mount -t tmpfs -o mode=0755 unpriv-cover {shlex.quote(top)}")
        n -= len(paths)
        for p in paths:
            lines.append(f"mkdir -p {shlex.quote(p)} && mount --move /mnt/{n} {shlex.quote(p)}")
            n += 1
    lines.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            "\n".join(lines), "sh", *drop, *argv]
