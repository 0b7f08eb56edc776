"""Shared test helpers: skip reasons for missing root, binaries or a bootable VMM; running
a program as an unprivileged user from a root test (:func:`unprivileged_argv`); the pids
of processes by name (:func:`pids_named`); a process's command line and parent
(:func:`cmdline`, :func:`ppid`) and finding and killing a process tree by a path in its
command lines (:func:`process_tree`, :func:`kill_process_tree`: the fleet benchmark
and tests clean up a Ray cluster so); the guest's HTTP server script
(:data:`GUEST_HTTP_SERVER`); the agent's tty-and-resize check (:func:`assert_tty_resize`)."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from microvm.agent import SyncAgentClient


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


def pids_named(prefix: str) -> set[int]:
    """The pids of every process whose ``comm`` starts with ``prefix`` (e.g. ``"passt"``).

    >>> os.getpid() in pids_named(Path(f"/proc/{os.getpid()}/comm").read_text()[:4])
    True
    """
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/comm").read_text().startswith(prefix):
                    out.add(int(d))
            except OSError:
                continue
    return out


def cmdline(pid: int) -> str:
    """Process ``pid``'s command line, arguments joined by spaces ("" if it is gone).

    >>> "python" in cmdline(os.getpid()) or "pytest" in cmdline(os.getpid())
    True
    """
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def ppid(pid: int) -> int:
    """Process ``pid``'s parent pid (-1 if it is gone).

    >>> ppid(os.getpid()) == os.getppid()
    True
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_tree(marker: str | Path) -> set[int]:
    """Every process (but this one) whose command line names ``marker`` (e.g. a Ray
    cluster's session directory), and all their descendants.

    >>> process_tree("/no/such/marker/dir")
    set()
    """
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    found = {p for p in pids if str(marker) in cmdline(p) and p != os.getpid()}
    grew = True
    while grew:
        grew = False
        for p in pids:
            if p not in found and ppid(p) in found:
                found.add(p)
                grew = True
    return found


def kill_process_tree(marker: str | Path, rounds: int = 3) -> None:
    """SIGKILL :func:`process_tree` of ``marker`` until it is empty (at most ``rounds``
    times, half a second apart).

    >>> kill_process_tree("/no/such/marker/dir")
    """
    for _ in range(rounds):
        pids = process_tree(marker)
        if not pids:
            break
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.5)


#: a Python script for ``python -c`` in a guest namespace: an HTTP server on
#: ``sys.argv[1]``:8000 answering GET with "hello from the guest, peer <client ip>";
#: prints "ready" once listening
GUEST_HTTP_SERVER = r"""
import http.server, socketserver, sys
class S(http.server.ThreadingHTTPServer):
    def server_bind(self):  # no getfqdn(): a reverse lookup would leave the namespace
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "guest", 8000
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from the guest, peer {self.client_address[0]}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
srv = S((sys.argv[1], 8000), H)
print("ready", flush=True)
srv.serve_forever()
"""


def assert_tty_resize(agent: SyncAgentClient, timeout: float) -> None:
    """Run ``stty size`` on a 30x100 tty in the guest, resize it to 50x132, and assert
    both sizes and a ``/dev/pts/`` tty came back and the command exited 0.

    Example (needs a booted guest)::

        assert_tty_resize(machine.agent, timeout=20)
    """
    p = agent.exec_stream(
        "/bin/sh", ["-c", "stty size; read x; stty size; tty"], tty=True, rows=30, cols=100
    )
    out = b""
    events = p.events(timeout=timeout)
    for ev in events:
        if ev.kind == "stdout":
            out += ev.data
            if b"30 100" in out:
                break
    p.resize(50, 132)
    p.write_stdin(b"go\n")
    last = None
    for ev in events:
        if ev.kind == "stdout":
            out += ev.data
        last = ev
    assert last is not None and last.kind == "exited" and last.exit_code == 0, out
    assert b"30 100" in out and b"50 132" in out and b"/dev/pts/" in out
