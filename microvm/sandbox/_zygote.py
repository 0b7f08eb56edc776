"""A pre-started supervisor "zygote": a process with the supervisor's imports loaded that
forks one supervisor per sandbox start, restore or fork.

Starting ``python -m microvm.sandbox._supervisor`` costs an interpreter start plus the
imports (asyncio, the machine, the relay, the network stack and ``tls_proxy``): 0.3-0.5 s
on our 2-core machines under load, 2 s with the network stack, more than QEMU's whole
incoming migration. A zygote pays that once per creating process: the second
:func:`spawn` without one (or :func:`prestart`) starts it in the background (those
starts themselves still use a plain ``Popen``), and every later one is an
``os.fork()`` of an already warm interpreter (a few milliseconds). A zygote serves one ``MICROVM_HOME``/``TMPDIR`` (another one
starts one anew) and exits after ``IDLE_EXIT_S`` without a request. It reports "ready"
once the core modules are loaded and imports the network modules (``NET_PRELOAD``)
while idle; a child that needs them before that imports them itself.

Protocol: a ``SOCK_SEQPACKET`` socketpair between the creating process and its zygote (no
socket file: nobody else can reach it; it dies with its creator, EOF on the pair). One
request per message: ``{"argv", "env", "cwd"}`` as JSON plus three file descriptors
(``SCM_RIGHTS``) that become the child's stdin, stdout and stderr; the answer is
``{"pid": N}``. The child starts a new session, takes the caller's environment and
working directory, and runs :func:`microvm.sandbox._supervisor.main` exactly as the
``-m`` entry point would. The zygote reaps its children; the creator talks to them only
through their pipes and sockets, as before. ``MICROVM_ZYGOTE=0`` turns it off.

Shared zygote (``prestart(shared=True)``, the ``microvm`` command): one-shot processes
cannot keep a warm zygote, so theirs outlives them: one per user, interpreter and
``MICROVM_HOME``/``TMPDIR``, listening on a ``SOCK_SEQPACKET`` unix socket in a private
runtime directory (``$MICROVM_ZYGOTE_DIR``, else ``$XDG_RUNTIME_DIR/microvm``, else
``/tmp/microvm-<uid>``; 0700, refused unless owned by us). The first command starts it
(detached); back-to-back commands fork from it. It checks every connection's peer uid
(``SO_PEERCRED``) and closes those of another user, and exits after ``IDLE_EXIT_S``
(``$MICROVM_ZYGOTE_IDLE_S``) with no connection and no request. Same protocol per
connection; ``zygote-<hash>.pid`` beside the socket holds ``"<pid> <forks served>"``.

The zygote itself never starts a thread or an event loop (``fork`` from a
single-threaded process only), and forks no sandbox state: each child reads its own
``launch.json`` and secrets line, as a spawned supervisor does.

Example::

    from microvm.sandbox import _zygote as zygote
    zygote.prestart()                    # optional: warm it before the first restore
    pid = zygote.spawn([sandbox_dir], stdin=r, stdout=w, stderr=log_fd)   # None: not ready
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["prestart", "runtime_dir", "spawn", "stop_shared", "wait_ready"]

#: modules every supervisor needs: loaded once in the zygote instead of in each child,
#: before it reports ready
PRELOAD = (
    "microvm.sandbox._supervisor", "microvm.sandbox._relay", "microvm.agent",
    "microvm.backends._qemu", "microvm._snapshot",
)
#: the network modules (a ``--net none`` supervisor never imports them): loaded after
#: "ready", while idle
NET_PRELOAD = ("microvm.sandbox._netwiring", "tls_proxy")
_READY = b"R"
#: the network modules load once the zygote has had no request or connection for this
#: long (a command's request follows its connection by ~0.1-0.3 s: not delayed by them)
_NET_AFTER_S = 0.5
#: a zygote with no request (and, shared, no connection) for this long exits (a later
#: start spawns a new one): long enough for back-to-back commands, short enough that an
#: idle user does not keep a ~50 MB interpreter around
IDLE_EXIT_S = 10.0
#: the environment that names where sandboxes live: a zygote serves one value of it
_KEY_VARS = ("MICROVM_HOME", "TMPDIR")
#: room in the zygote's argv for each child's ``python -m microvm.sandbox._supervisor DIR``
_ARGV_ROOM = 1024


class _Zygote:
    shared = False

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.key = _key(os.environ)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "microvm.sandbox._zygote", str(child.fileno()),
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

    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None

    def close(self) -> None:
        self.sock.close()   # it exits on EOF
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(0)

    def _wait_ready(self) -> None:
        try:
            if self.sock.recv(16) == _READY:
                self.ready.set()
                return
        except OSError:
            pass
        self.dead = True

    def spawn(self, argv: list[str], fds: tuple[int, int, int], env: dict[str, str]) -> int | None:
        req = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd(),
                          "umask": _umask()}).encode()
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


class _SharedZygote(_Zygote):
    """A connection to this user's shared zygote (started detached when none listens)."""

    shared = True

    def __init__(self) -> None:   # no super(): no socketpair, no child process
        self.key = _key(os.environ)
        self.path = _socket_path(os.environ)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.ready = threading.Event()
        self.dead = False
        self.lock = threading.Lock()
        threading.Thread(target=self._connect, daemon=True,
                         name="microvm-zygote-connect").start()

    def alive(self) -> bool:
        return not self.dead

    def close(self) -> None:
        self.sock.close()

    def _connect(self) -> None:
        deadline = time.monotonic() + 30.0
        starter: subprocess.Popen[bytes] | None = None
        while True:
            try:
                self.sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if starter is None:
                    try:
                        starter = _start_shared(self.path)
                    except OSError:
                        self.dead = True
                        return
                # exit 0: another one holds the lock (it binds soon); else it failed
                if time.monotonic() >= deadline or starter.poll() not in (None, 0):
                    self.dead = True
                    return
                time.sleep(0.005)
            except OSError:
                self.dead = True
                return
        self._wait_ready()


def runtime_dir(env: Any = None) -> Path:
    """The private directory of this user's shared zygote sockets:
    ``$MICROVM_ZYGOTE_DIR``, else ``$XDG_RUNTIME_DIR/microvm``, else
    ``/tmp/microvm-<uid>``. Created 0700; raises ``PermissionError`` when it exists but is
    not a directory owned by us or is open to others.

    Example::

        print(runtime_dir())
    """
    env = os.environ if env is None else env
    if env.get("MICROVM_ZYGOTE_DIR"):
        d = Path(env["MICROVM_ZYGOTE_DIR"])
    elif env.get("XDG_RUNTIME_DIR"):
        d = Path(env["XDG_RUNTIME_DIR"]) / "microvm"
    else:
        d = Path(f"/tmp/microvm-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700, parents=True)
    st = os.lstat(d)
    import stat as stat_mod

    if not stat_mod.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(errno.EPERM, "zygote runtime directory is not a private "
                              "directory of ours (0700, our uid)", str(d))
    return d


def _socket_path(env: Any) -> Path:
    tag = "\0".join((sys.executable, _code_root(), *_key(env)))
    return runtime_dir(env) / f"zygote-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.sock"


def _start_shared(path: Path) -> subprocess.Popen[bytes]:
    # never waited for when it runs on: it outlives us (reparented, reaped by init)
    return subprocess.Popen(
        [sys.executable, "-m", "microvm.sandbox._zygote", "--listen", str(path),
         "." * _ARGV_ROOM],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=True, start_new_session=True, cwd="/",
        env=_zygote_env())


def _zygote_env() -> dict[str, str]:
    """Our environment, with our code's directory first on ``PYTHONPATH`` unless it is
    an installed package's (``site-packages``: on the path anyway)."""
    root = _code_root()
    if Path(root).name in ("site-packages", "dist-packages"):
        return dict(os.environ)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}


def _code_root() -> str:
    """The directory our packages are imported from: the shared zygote imports the same
    code as its clients (its cwd is ``/``: no client's cwd on its ``sys.path``)."""
    return str(Path(__file__).resolve().parents[2])


def _umask() -> int | None:
    """This process's umask (``/proc/self/status``: reading it with ``os.umask`` would
    change it for a moment under the other threads); None when unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return None


def stop_shared(directory: Path | None = None, timeout: float = 5.0) -> int:
    """Stop every shared zygote of ``directory`` (default: :func:`runtime_dir`) and wait
    up to ``timeout`` s for them to exit; returns how many were stopped. A test session
    calls it so that none outlives it.

    Example::

        stop_shared()
    """
    d = runtime_dir() if directory is None else directory
    pids = []
    for status in d.glob("zygote-*.pid"):
        try:
            pid = int(status.read_text().split()[0])
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if b"microvm.sandbox._zygote" in cmd and str(status.with_suffix(".sock")).encode() in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
    from microvm.sandbox._state import process_alive

    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and process_alive(pid, None):
            time.sleep(0.01)
    return len(pids)


_LOCK = threading.Lock()
_ZYGOTE: _Zygote | None = None
_SPAWNS = 0   # starts this process made without a ready zygote


def _key(env: Any) -> tuple[str, ...]:
    return tuple(str(env.get(k, "")) for k in _KEY_VARS)


def _enabled() -> bool:
    return os.environ.get("MICROVM_ZYGOTE", "1") != "0"


def prestart(shared: bool = False) -> None:
    """Start this process's zygote in the background if it is not running (idempotent).
    ``shared``: connect to (or start) this user's shared zygote instead, which outlives
    this process (for one-shot processes: the ``microvm`` command).

    Example::

        prestart()
    """
    global _ZYGOTE
    if not _enabled():
        return
    with _LOCK:
        z = _ZYGOTE
        if z is None or not z.alive() or z.key != _key(os.environ) or z.shared != shared:
            if z is not None:
                z.close()
            new: _Zygote | None = None
            if shared:
                with contextlib.suppress(OSError):   # no private runtime directory:
                    new = _SharedZygote()            # this process's own zygote then
            _ZYGOTE = new or _Zygote()


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
    while z is not None and z.alive():
        if z.ready.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline:
            return False
    return False


def spawn(argv: list[str], *, stdin: int, stdout: int, stderr: int,
          env: dict[str, str] | None = None) -> int | None:
    """Fork a supervisor from the warm zygote: ``python -m microvm.sandbox._supervisor
    *argv`` with those fds as 0/1/2, in a new session. Returns its pid, or None when the
    zygote is not ready yet: the caller spawns the usual way this time, and the zygote is
    started (from a process's second start on, or at once after :func:`prestart`).

    Example::

        pid = spawn(["/root/.microvm/sandboxes/web"], stdin=r, stdout=w, stderr=2)
    """
    global _SPAWNS
    z = _ZYGOTE
    env = dict(os.environ if env is None else env)
    if z is None or not z.alive() or not z.ready.is_set() or z.key != _key(env):
        # a process's first start never pays for a zygote (the CLI starts one sandbox
        # and exits); from the second on, one is warmed for the next
        _SPAWNS += 1
        if _SPAWNS > 1 or z is not None:
            prestart(z is not None and z.shared)
        return None
    pid = z.spawn(list(argv), (stdin, stdout, stderr), env)
    if pid is None:
        prestart(z.shared)
    return pid


# -- the zygote process ------------------------------------------------------------------
def _child(req: dict[str, Any], fds: list[int]) -> int:
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(req["cwd"])
    if isinstance(req.get("umask"), int):
        os.umask(req["umask"] & 0o777)   # the caller's, not the zygote's starter's
    os.environ.clear()
    os.environ.update(req["env"])
    import tempfile

    tempfile.tempdir = None   # computed again from this TMPDIR
    argv = [str(a) for a in req["argv"]]
    _set_cmdline([sys.executable, "-m", "microvm.sandbox._supervisor", *argv])
    from microvm.sandbox import _supervisor as supervisor

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


def _peer_uid(conn: socket.socket) -> int:
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _fork_child(conn: socket.socket, socks: list[socket.socket]) -> int | None:
    """Serve one request on ``conn``: -1 when it is closed (EOF, error), else the child's
    pid (None: a bad request, answered)."""
    try:
        msg, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
    except OSError:
        return -1
    req: Any = None
    with contextlib.suppress(ValueError):
        req = json.loads(msg) if msg else None
    if not isinstance(req, dict) or len(fds) != 3 or not isinstance(req.get("argv"), list) \
            or not isinstance(req.get("env"), dict) or not isinstance(req.get("cwd"), str):
        for fd in fds:
            os.close(fd)
        if not msg:
            return -1
        with contextlib.suppress(OSError):
            conn.send(b'{"error": "bad request"}')
        return None
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for s in socks:
                s.close()
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
    with contextlib.suppress(OSError):
        conn.send(json.dumps({"pid": pid}).encode())
    return pid


def _serve(sock: socket.socket | None, listener: socket.socket | None = None,
           status: Path | None = None) -> int:
    """The zygote's loop: ``sock`` (its creator's end of the socketpair; EOF: exit) or
    ``listener`` (the shared zygote's socket: connections of our uid only)."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # children reaped by the kernel
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            __import__(name)
    conns = [sock] if sock is not None else []
    for c in conns:
        c.send(_READY)
    pending = list(NET_PRELOAD)
    try:
        idle_s = float(os.environ.get("MICROVM_ZYGOTE_IDLE_S", IDLE_EXIT_S))
    except ValueError:
        idle_s = IDLE_EXIT_S
    last = time.monotonic()
    served = 0
    while True:
        watch = conns + ([listener] if listener is not None else [])
        now = time.monotonic()
        wait = max(0.0, last + (_NET_AFTER_S if pending else idle_s) - now)
        try:
            readable, _w, _x = select.select(watch, [], [], wait)
        except InterruptedError:
            continue
        if not readable:
            if pending:   # idle a while: load the network modules, one at a time
                with contextlib.suppress(Exception):
                    __import__(pending.pop(0))
                continue
            return 0      # idle: a later start spawns a new one
        for r in readable:
            if r is listener:
                try:
                    conn, _addr = listener.accept()
                except OSError:
                    continue
                try:
                    if _peer_uid(conn) != os.getuid():
                        conn.close()   # another user: refused
                        continue
                    conn.send(_READY)
                except OSError:
                    conn.close()
                    continue
                conns.append(conn)
                last = time.monotonic()
                continue
            pid = _fork_child(r, [*conns, *([listener] if listener else [])])
            if pid == -1:
                r.close()
                conns.remove(r)
                if listener is None:
                    return 0   # the creator is gone
                continue
            last = time.monotonic()
            if pid is not None and status is not None:
                served += 1
                _write_status(status, served)


def _write_status(status: Path, served: int) -> None:
    tmp = status.with_name(status.name + ".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(f"{os.getpid()} {served}\n")
        os.replace(tmp, status)


def _listen_main(path: Path) -> int:
    """The shared zygote: one per socket path (a lock file says who); removes its socket
    and pid file when it exits (idle, SIGTERM)."""
    parent = os.lstat(path.parent)
    if parent.st_uid != os.getuid() or parent.st_mode & 0o077:
        return 2   # not our private directory
    lock_fd = os.open(str(path) + ".lock",
                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        return 0   # another one runs (or starts): the clients connect to it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    status = path.with_suffix(".pid")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    ino = None
    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()   # stale: its zygote died without cleaning up (we hold the lock)
        old = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        ino = os.stat(path).st_ino
        listener.listen(64)
        _write_status(status, 0)
        return _serve(None, listener, status)
    finally:
        with contextlib.suppress(OSError):
            if ino is not None and os.stat(path).st_ino == ino:
                path.unlink()
                status.unlink()
        listener.close()
        os.close(lock_fd)


if __name__ == "__main__":
    if sys.argv[1] == "--listen":
        sys.exit(_listen_main(Path(sys.argv[2])))
    sys.exit(_serve(socket.socket(fileno=int(sys.argv[1]))))
