"""A pre-started supervisor "zygote": a process with the supervisor's imports loaded that
forks one supervisor per sandbox start, restore or fork.

Starting ``python -m microvm.sandbox.supervisor`` costs an interpreter start plus the
imports (asyncio, the machine, the relay, the network stack and ``tls_proxy``): 0.3-0.5 s
on our 2-core machines under load, 2 s with the network stack, more than QEMU's whole
incoming migration. A zygote pays that once per creating process: the first
:func:`spawn` starts it in the background (that start itself still uses a plain
``Popen``), and every later one is an ``os.fork()`` of an already warm interpreter
(a few milliseconds). A zygote serves one ``MICROVM_HOME``/``TMPDIR`` (another one
starts one anew) and exits after ``IDLE_EXIT_S`` without a request.

Protocol: a ``SOCK_SEQPACKET`` socketpair between the creating process and its zygote (no
socket file: nobody else can reach it; it dies with its creator, EOF on the pair). One
request per message: ``{"argv", "env", "cwd"}`` as JSON plus three file descriptors
(``SCM_RIGHTS``) that become the child's stdin, stdout and stderr; the answer is
``{"pid": N}``. The child starts a new session, takes the caller's environment and
working directory, and runs :func:`microvm.sandbox.supervisor.main` exactly as the
``-m`` entry point would. The zygote reaps its children; the creator talks to them only
through their pipes and sockets, as before. ``MICROVM_ZYGOTE=0`` turns it off.

The zygote itself never starts a thread or an event loop (``fork`` from a
single-threaded process only), and forks no sandbox state: each child reads its own
``launch.json`` and secrets line, as a spawned supervisor does.

Example::

    from microvm.sandbox import zygote
    zygote.prestart()                    # optional: warm it before the first restore
    pid = zygote.spawn([sandbox_dir], stdin=r, stdout=w, stderr=log_fd)   # None: not ready
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["prestart", "spawn", "wait_ready"]

#: modules every supervisor needs: loaded once in the zygote instead of in each child
PRELOAD = (
    "microvm.sandbox.supervisor", "microvm.sandbox._relay", "microvm.agent",
    "microvm.backends.qemu", "microvm.snapshot", "microvm.sandbox._netwiring", "tls_proxy",
)
_READY = b"R"
#: a zygote with no request for this long exits (a later start spawns a new one)
IDLE_EXIT_S = 10.0
#: the environment that names where sandboxes live: a zygote serves one value of it
_KEY_VARS = ("MICROVM_HOME", "TMPDIR")
#: room in the zygote's argv for each child's ``python -m microvm.sandbox.supervisor DIR``
_ARGV_ROOM = 1024


class _Zygote:
    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.key = _key(os.environ)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "microvm.sandbox.zygote", str(child.fileno()),
                 "." * _ARGV_ROOM],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(child.fileno(),), close_fds=True, start_new_session=True)
        finally:
            child.close()
        self.sock = parent
        self.ready = threading.Event()
        self.dead = False
        self.lock = threading.Lock()
        threading.Thread(target=self._wait_ready, daemon=True,
                         name="microvm-zygote-ready").start()

    def _wait_ready(self) -> None:
        try:
            if self.sock.recv(16) == _READY:
                self.ready.set()
                return
        except OSError:
            pass
        self.dead = True

    def spawn(self, argv: list[str], fds: tuple[int, int, int], env: dict[str, str]) -> int | None:
        req = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd()}).encode()
        with self.lock:
            try:
                socket.send_fds(self.sock, [req], list(fds))
                self.sock.settimeout(30.0)
                answer = self.sock.recv(4096)
            except OSError:
                self.dead = True
                return None
            finally:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(None)
        if not answer:
            self.dead = True
            return None
        pid = json.loads(answer).get("pid")
        return int(pid) if isinstance(pid, int) else None


_LOCK = threading.Lock()
_ZYGOTE: _Zygote | None = None
_SPAWNS = 0   # starts this process made without a ready zygote


def _key(env: Any) -> tuple[str, ...]:
    return tuple(str(env.get(k, "")) for k in _KEY_VARS)


def _enabled() -> bool:
    return os.environ.get("MICROVM_ZYGOTE", "1") != "0"


def prestart() -> None:
    """Start this process's zygote in the background if it is not running (idempotent).

    Example::

        prestart()
    """
    global _ZYGOTE
    if not _enabled():
        return
    with _LOCK:
        z = _ZYGOTE
        if z is None or z.dead or z.proc.poll() is not None or z.key != _key(os.environ):
            if z is not None:
                z.sock.close()   # it exits on EOF
                with contextlib.suppress(subprocess.TimeoutExpired):
                    z.proc.wait(0)
            _ZYGOTE = _Zygote()


def wait_ready(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the zygote :func:`prestart` started; True once it
    forks supervisors (False: off, not started, dead, or still loading). A one-shot
    process (the ``microvm`` command) prestarts it first thing and waits here before its
    only start: the zygote's imports overlap its own instead of a second interpreter's.

    Example::

        prestart(); ...; wait_ready(10.0)
    """
    z = _ZYGOTE
    deadline = time.monotonic() + timeout
    while z is not None and not z.dead and z.proc.poll() is None:
        if z.ready.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline:
            return False
    return False


def spawn(argv: list[str], *, stdin: int, stdout: int, stderr: int,
          env: dict[str, str] | None = None) -> int | None:
    """Fork a supervisor from the warm zygote: ``python -m microvm.sandbox.supervisor
    *argv`` with those fds as 0/1/2, in a new session. Returns its pid, or None when the
    zygote is not ready yet: the caller spawns the usual way this time, and the zygote is
    started (from a process's second start on, or at once after :func:`prestart`).

    Example::

        pid = spawn(["/root/.microvm/sandboxes/web"], stdin=r, stdout=w, stderr=2)
    """
    global _SPAWNS
    z = _ZYGOTE
    env = dict(os.environ if env is None else env)
    if z is None or z.dead or not z.ready.is_set() or z.key != _key(env) \
            or z.proc.poll() is not None:
        # a process's first start never pays for a zygote (the CLI starts one sandbox
        # and exits); from the second on, one is warmed for the next
        _SPAWNS += 1
        if _SPAWNS > 1 or z is not None:
            prestart()
        return None
    pid = z.spawn(list(argv), (stdin, stdout, stderr), env)
    if pid is None:
        prestart()
    return pid


# -- the zygote process ------------------------------------------------------------------
def _child(req: dict[str, Any], fds: list[int]) -> int:
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    import tempfile

    tempfile.tempdir = None   # computed again from this TMPDIR
    argv = [str(a) for a in req["argv"]]
    _set_cmdline([sys.executable, "-m", "microvm.sandbox.supervisor", *argv])
    from microvm.sandbox import supervisor

    return supervisor.main(argv)


def _set_cmdline(args: list[str]) -> None:
    """Show ``args`` as this process's command line (``ps``, ``/proc/<pid>/cmdline``): a
    forked supervisor looks like a spawned one. Written over the zygote's argv area
    (room reserved at its start) through ``/proc/self/mem``; best effort."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path("/proc/self/stat").read_bytes()
        fields = stat[stat.rindex(b")") + 2:].split()
        start, end = int(fields[45]), int(fields[46])   # arg_start, arg_end (proc(5))
        data = b"\0".join(os.fsencode(a) for a in args) + b"\0"
        data = data[:end - start - 1] + b"\0"
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(data.ljust(end - start, b"\0"))


def _serve(sock: socket.socket) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # children reaped by the kernel
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            __import__(name)
    sock.send(_READY)
    sock.settimeout(IDLE_EXIT_S)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 3)
        except TimeoutError:
            return 0   # idle: the creator spawns a new one when it needs one
        except OSError:
            return 1
        if not msg:
            return 0
        try:
            req = json.loads(msg)
        except ValueError:
            for fd in fds:
                os.close(fd)
            sock.send(b'{"error": "bad request"}')
            continue
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sock.close()
                code = _child(req, fds)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                with contextlib.suppress(Exception):
                    traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"pid": pid}).encode())


if __name__ == "__main__":
    sys.exit(_serve(socket.socket(fileno=int(sys.argv[1]))))
