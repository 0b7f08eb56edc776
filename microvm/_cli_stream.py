"""Wire a command in a sandbox to this terminal: output, stdin (with EOF), TTY, resize, detach.

Everything goes through :meth:`microvm.Sandbox.exec_stream`; this module only copies bytes
and signals. Output is written to fds 1 and 2 as it arrives (unbuffered, binary-safe,
constant memory); ``-i`` forwards stdin and its EOF; ``-t`` asks for a guest TTY, puts the
host terminal in raw mode and forwards SIGWINCH as a resize; detach keys end the session
and leave the command and the sandbox running.

Example::

    from microvm import Sandbox
    from microvm._cli_stream import stream
    sb = Sandbox.get("web")
    code = stream(sb, ["/bin/sh"], stdin=True, tty=True)
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from microvm.sandbox._sandbox import ExecHandle, Sandbox

__all__ = ["DETACHED", "Interrupted", "parse_detach_keys", "stream"]

DETACHED = -1
"""What :func:`stream` returns when the user typed the detach keys."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP (or a second Ctrl-C) arrived while streaming: the caller cleans up.

    Example::

        try:
            stream(sb, ["/bin/sleep", "60"], stdin=False, tty=False)
        except Interrupted as e:
            sb.stop(); sys.exit(128 + e.signum)
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def parse_detach_keys(spec: str) -> bytes:
    """Docker's detach-key syntax: ``ctrl-]`` (default), ``ctrl-p,ctrl-q``, letters.

    Example::

        >>> parse_detach_keys("ctrl-p,ctrl-q")
        b'\\x10\\x11'
    """
    out = bytearray()
    for part in spec.split(","):
        p = part.strip()
        low = p.lower()
        if low.startswith("ctrl-") and len(p) == 6:
            c = low[5]
            code = {"@": 0, "[": 27, "\\": 28, "]": 29, "^": 30, "_": 31}.get(c)
            if code is None and "a" <= c <= "z":
                code = ord(c) - ord("a") + 1
            if code is not None:
                out.append(code)
                continue
        elif len(p) == 1 and p.isprintable():
            out.append(ord(p))
            continue
        raise click.BadParameter(f"{spec!r}: keys are ctrl-<a-z, @, [, \\, ], ^, _> or one "
                                 f"character, comma-separated (e.g. ctrl-p,ctrl-q)",
                                 param_hint="--detach-keys")
    if not out:
        raise click.BadParameter(f"{spec!r} names no key", param_hint="--detach-keys")
    return bytes(out)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def _term_size() -> tuple[int, int]:
    for fd in (1, 0, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines or 24, size.columns or 80
    return 24, 80


class _Session:
    """The threads of one streamed exec: output pump, stdin pump, result."""

    def __init__(self, h: ExecHandle, *, stdin: bool, tty: bool, detach: bytes | None) -> None:
        self.h = h
        self.stdin = stdin
        self.tty = tty
        self.detach = detach
        self.done = threading.Event()
        self.code: int | None = None
        self.error: str | None = None
        self.wake_r, self.wake_w = os.pipe()
        self.out_broken = False

    # -- output --------------------------------------------------------------------
    def pump_output(self) -> None:
        try:
            for ev in self.h.events():
                if ev.kind in ("stdout", "stderr"):
                    if not self.out_broken:
                        try:
                            _write_all(1 if ev.kind == "stdout" else 2, ev.data)
                        except BrokenPipeError:
                            self.out_broken = True
                elif ev.kind == "exited":
                    if ev.timed_out:
                        self.error = "the command timed out (--timeout) and was killed"
                    self.code = 128 + int(ev.signal) if ev.signal else int(ev.exit_code or 0)
                    return
            self.error = "the agent connection ended before the command exited"
        except Exception as e:  # reported as one line by the caller
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.done.set()

    # -- input ---------------------------------------------------------------------
    def pump_input(self) -> None:
        watch = [self.wake_r] + ([0] if self.stdin else [])
        held = 0  # how many bytes of the detach sequence were typed so far
        keys = self.detach or b""
        try:
            while not self.done.is_set():
                ready, _, _ = select.select(watch, [], [])
                if self.wake_r in ready:
                    if not os.read(self.wake_r, 64):
                        return
                    if self.tty:
                        self.h.resize(*_term_size())
                if 0 in ready:
                    data = os.read(0, 65536)
                    if not data:
                        self.h.stdin.close()
                        watch.remove(0)
                        continue
                    if keys:
                        data, held, hit = _scan_detach(data, keys, held)
                        if hit:
                            self.code = DETACHED
                            self.done.set()
                            return
                    if data:
                        self.h.stdin.write(data)
        except Exception:  # the process exited meanwhile; the output pump reports
            return


def _scan_detach(data: bytes, keys: bytes, held: int) -> tuple[bytes, int, bool]:
    """Filter the detach sequence out of ``data``; a partial match is held back.

    >>> _scan_detach(b"ab\\x10", b"\\x10\\x11", 0)
    (b'ab', 1, False)
    >>> _scan_detach(b"\\x11", b"\\x10\\x11", 1)
    (b'', 2, True)
    """
    out = bytearray()
    for b in data:
        if b == keys[held]:
            held += 1
            if held == len(keys):
                return bytes(out), held, True
            continue
        if held:
            out += keys[:held]
            held = 0
            if b == keys[0]:
                held = 1
                continue
        out.append(b)
    return bytes(out), held, False


def stream(sb: Sandbox, argv: Sequence[str], *, stdin: bool, tty: bool,
           env: Mapping[str, str] | None = None, cwd: str | None = None,
           user: str | None = None, timeout: float | None = None,
           detach_keys: bytes | None = None) -> int:
    """Run ``argv`` in ``sb`` wired to this process; its exit status (128+N when killed by
    signal N), or :data:`DETACHED`.

    Raises ``AgentError`` when the command cannot start (``kind`` not_found...) and
    :class:`Interrupted` on SIGTERM/SIGHUP or a second Ctrl-C (the first Ctrl-C is sent
    to the command when there is no TTY; with a TTY it is a keystroke).

    Example::

        code = stream(Sandbox.get("web"), ["/bin/ls", "/"], stdin=False, tty=False)
    """
    rows, cols = _term_size() if tty else (24, 80)
    h = sb.exec_stream(argv[0], list(argv[1:]), stdin=stdin, tty=tty, rows=rows, cols=cols,
                       env=env, cwd=cwd, user=user, timeout=timeout)
    s = _Session(h, stdin=stdin, tty=tty, detach=detach_keys if tty else None)
    in_main = threading.current_thread() is threading.main_thread()
    raw = tty and stdin and os.isatty(0)
    saved: Any = None
    previous: dict[int, Any] = {}
    hits = 0

    def on_int(signum: int, frame: FrameType | None) -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            raise Interrupted(signum)
        with contextlib.suppress(Exception):
            h.signal(signal.SIGINT)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    def on_winch(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.write(s.wake_w, b"w")

    out_thread = threading.Thread(target=s.pump_output, name="microvm-out", daemon=True)
    in_thread = threading.Thread(target=s.pump_input, name="microvm-in", daemon=True)
    try:
        if in_main:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_int)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                previous[sig] = signal.signal(sig, on_term)
            if tty:
                previous[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, on_winch)
        if raw:
            import termios
            import tty as ttymod

            saved = termios.tcgetattr(0)
            ttymod.setraw(0)
        out_thread.start()
        if stdin or tty:
            in_thread.start()
        while not s.done.wait(0.25):
            pass
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(s.wake_w)  # wakes and ends the input pump
        if not in_thread.is_alive():
            os.close(s.wake_r)
    if s.code is None:
        raise _agent_lost(s.error)
    if s.error:
        click.echo(f"microvm: {s.error}", err=True)
    sys.stdout.flush()
    return s.code


def _agent_lost(why: str | None) -> Exception:
    from microvm.errors import SandboxError

    return SandboxError(why or "the command ended without an exit status")
