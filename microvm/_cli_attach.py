"""A sandbox's *main process* (what ``run -d`` starts) and ``attach`` to it, docker-style.

``run -d IMAGE [CMD]`` starts CMD (default: the image's entrypoint+cmd) in the guest in the
background, detached from any agent session, with its output on the guest console; its
pid, its exit status once it ends, and with ``-i`` a FIFO that is its stdin live under
``/run/microvm-main`` in the guest (a tmpfs: a snapshot carries them along with the
process). ``attach NAME`` then shows the main process's output as it comes (the console,
from now on), forwards this terminal's input lines to it when it was started with ``-i``,
and ends with its exit status when it exits; Ctrl-C or the detach keys leave it running.
The main process has no TTY (the guest console is one-way), so the terminal stays in
line mode; a sandbox without a main process gets a TTY session in its shell instead
(see ``microvm._cli_sandbox``).

Example::

    launch_main(sb, ["httpd", "-f", "-p", "80"], stdin=False)
    code = attach_main(sb, b"\\x1d")      # None: no main process in that sandbox
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from microvm._cli_stream import DETACHED, _scan_detach, _write_all
from microvm._cli_util import Failure, read_new

if TYPE_CHECKING:
    from microvm.sandbox._sandbox import Sandbox

__all__ = ["MAIN_DIR", "attach_main", "launch_main"]

MAIN_DIR = "/run/microvm-main"
"""Guest directory of the main process: ``pid``, ``exit`` (its status), ``stdin`` (FIFO)."""

# $1 is -i (a FIFO for stdin) or -; the rest is the command. The FIFO is opened read-write
# so the process never blocks on it or sees EOF between two attaches. The launcher returns
# once the pid is recorded (an attach right after `run -d` finds it).
_LAUNCH = (
    f'd={MAIN_DIR}; mkdir -p $d && rm -f $d/pid $d/exit $d/stdin || exit 1\n'
    'in=/dev/null; if [ "$1" = -i ]; then mkfifo -m 600 $d/stdin && in=$d/stdin || exit 1; fi\n'
    'shift\n'
    '( "$@" <>"$in" >/dev/console 2>&1 & echo $! > $d/pid.new && mv $d/pid.new $d/pid\n'
    '  wait $!; echo $? > $d/exit.new && mv $d/exit.new $d/exit ) </dev/null >/dev/null 2>&1 &\n'
    'i=0; while [ ! -s $d/pid ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done\n'
)
_STATUS = (f'd={MAIN_DIR}; [ -s $d/pid ] || exit 3; '
           'printf "%s %s %s" "$(cat $d/pid)" "$([ -p $d/stdin ] && echo 1 || echo 0)" '
           '"$(cat $d/exit 2>/dev/null)"')


def launch_main(sb: Sandbox, argv: list[str], *, stdin: bool) -> None:
    """Start ``argv`` as ``sb``'s main process (see the module docstring); with ``stdin``
    its stdin is a FIFO ``attach`` writes to, else ``/dev/null``.

    Raises ``Failure`` (exit 125) when the launcher itself fails.

    Example::

        launch_main(sb, ["sleep", "600"], stdin=False)
    """
    out = sb.exec(sb.config.shell, ["-c", _LAUNCH, "sh", "-i" if stdin else "-", *argv])
    if not out.success:
        raise Failure(f"could not start {argv[0]!r} in the background: {out.stderr_text}")


def _status(sb: Sandbox) -> tuple[int, bool, int | None] | None:
    """(pid, has a stdin FIFO, exit status or None while it runs), or None: no main."""
    out = sb.exec(sb.config.shell, ["-c", _STATUS])
    if out.exit_code == 3:
        return None
    parts = out.stdout_text.split()
    if not out.success or len(parts) < 2 or not parts[0].isdigit():
        return None
    code = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None
    return int(parts[0]), parts[1] == "1", code


class _Leave(BaseException):
    """Ctrl-C, SIGTERM or SIGHUP while attached: leave (the main process keeps running)."""


def attach_main(sb: Sandbox, detach_keys: bytes) -> int | None:
    """Attach this process to ``sb``'s main process until it exits (its status), Ctrl-C or
    the detach keys (:data:`~microvm._cli_stream.DETACHED`); None when ``sb`` has none.

    Example::

        code = attach_main(Sandbox.get("web"), b"\\x10\\x11")
    """
    st = _status(sb)
    if st is None:
        return None
    _pid, has_stdin, code = st
    if code is not None:
        click.echo(f"microvm: the main process of {sb.name!r} has exited (status {code})",
                   err=True)
        return code
    path = sb.paths.console_log
    pos = path.stat().st_size if path.exists() else 0
    feeder = (sb.exec_stream(sb.config.shell, ["-c", f"exec cat > {MAIN_DIR}/stdin"],
                             stdin=True) if has_stdin else None)
    done = threading.Event()
    detached = threading.Event()

    def pump_input() -> None:
        held = 0
        try:
            while not done.is_set():
                ready, _, _ = select.select([0], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(0, 65536)
                if not data:
                    if feeder is not None:
                        feeder.stdin.close()
                    return
                data, held, hit = _scan_detach(data, detach_keys, held)
                if hit:
                    detached.set()
                    return
                if data and feeder is not None:
                    feeder.stdin.write(data)
        except Exception:   # the sandbox or the feeder went away: the main loop reports
            return

    def leave(signum: int, frame: FrameType | None) -> None:
        raise _Leave

    previous: dict[int, Any] = {}
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, leave)
    reader = threading.Thread(target=pump_input, name="microvm-attach-in", daemon=True)
    reader.start()
    next_check = time.monotonic() + 0.5
    result: int | None = None
    try:
        while result is None:
            chunk, pos = read_new(path, pos, 1 << 20)
            if chunk:
                with contextlib.suppress(BrokenPipeError):
                    _write_all(1, chunk)
                continue
            if detached.is_set():
                result = DETACHED
            elif time.monotonic() >= next_check:
                st = _status(sb)
                if st is None or st[2] is not None:
                    time.sleep(0.2)              # its last output reaches the console log
                    if path.exists() and path.stat().st_size > pos:
                        continue
                    result = st[2] if st is not None and st[2] is not None else 0
                next_check = time.monotonic() + 0.5
            else:
                time.sleep(0.05)
    except _Leave:
        result = DETACHED
    finally:
        done.set()
        for s, h in previous.items():
            signal.signal(s, h)
        if feeder is not None:
            with contextlib.suppress(Exception):
                feeder.kill()
        sys.stdout.flush()
    return result
