"""Exceptions raised by :mod:`microvm`; all derive from :class:`MicrovmError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microvm.agent.protocol import ExecResult


class MicrovmError(Exception):
    """Base class of every error raised by microvm.

    >>> from microvm.backends import get_backend
    >>> try:
    ...     get_backend("bhyve")
    ... except MicrovmError as e:
    ...     print(type(e).__name__)
    BackendUnavailable
    """


class KernelError(MicrovmError):
    """The guest kernel (libkrunfw) could not be fetched, verified or converted.

    >>> from microvm.kernel import fetch_kernel
    >>> fetch_kernel(source="ftp")
    Traceback (most recent call last):
    ...
    microvm.errors.KernelError: unknown kernel source 'ftp': use auto, system, debian or wheel
    """


class BackendUnavailable(MicrovmError):
    """A VMM backend cannot run on this host (binary, library or KVM missing); the message says how to install it.

    >>> from microvm.backends import get_backend
    >>> get_backend("bhyve")
    Traceback (most recent call last):
    ...
    microvm.errors.BackendUnavailable: unknown backend 'bhyve': use 'qemu' or 'libkrun'
    """


class BootError(MicrovmError):
    """The guest did not come up; ``console_tail`` holds the last lines of the guest console.

    >>> e = BootError("the guest agent did not answer in 30 s", console_tail="Kernel panic")
    >>> str(e).splitlines()[-1], e.console_tail
    ('Kernel panic', 'Kernel panic')
    >>> try:                                    # doctest: +SKIP
    ...     machine.start()
    ... except BootError as e:
    ...     print(e.console_tail)
    """

    def __init__(self, message: str, console_tail: str = "") -> None:
        full = message if not console_tail else f"{message}\n--- guest console (tail) ---\n{console_tail}"
        super().__init__(full)
        self.console_tail = console_tail


class AgentError(MicrovmError):
    """The guest agent refused a request or the agent channel failed.

    ``kind`` is the agent's error kind (e.g. ``"not_found"``, ``"bad_request"``,
    ``"connection_lost"``); ``errno`` / ``errno_name`` are set for OS-level failures.

    >>> e = AgentError("exec /no/such/binary: No such file or directory", kind="not_found",
    ...                errno=2, errno_name="ENOENT")
    >>> e.kind, e.errno_name
    ('not_found', 'ENOENT')
    >>> try:                                    # doctest: +SKIP
    ...     machine.agent.exec("/no/such/binary")
    ... except AgentError as e:
    ...     assert e.kind == "not_found"
    """

    def __init__(self, message: str, kind: str = "other", errno: int = 0, errno_name: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.errno = errno
        self.errno_name = errno_name


class ExecTimeout(AgentError):
    """A command ran past its timeout; its process group was killed.

    ``result`` holds the output collected before the kill (an ``ExecResult``).

    >>> ExecTimeout("sleep 60: timed out after 1 s").kind
    'timeout'
    >>> try:                                    # doctest: +SKIP
    ...     machine.agent.exec("sleep", ["60"], timeout=1)
    ... except ExecTimeout as e:
    ...     print(e.result.stdout)
    """

    def __init__(self, message: str, result: ExecResult | None = None) -> None:
        super().__init__(message, kind="timeout")
        self.result = result


class SandboxError(MicrovmError):
    """A sandbox operation failed (base of the ``Sandbox`` errors below).

    >>> from microvm import Sandbox
    >>> try:
    ...     Sandbox.get("nope")
    ... except SandboxError as e:
    ...     print(e)
    no sandbox named 'nope'
    """


class SandboxConfigError(SandboxError, ValueError):
    """An argument of ``Sandbox.create`` (or ``exec``) is invalid; raised before anything starts.

    >>> from microvm import Sandbox
    >>> Sandbox.create("bad name!", image="busybox:1.36")
    Traceback (most recent call last):
    ...
    microvm.errors.SandboxConfigError: bad sandbox name 'bad name!': use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit
    """


class SandboxNotFound(SandboxError, LookupError):
    """No sandbox of that name exists in ``$MICROVM_HOME/sandboxes.db``.

    >>> from microvm import Sandbox
    >>> Sandbox.get("missing")
    Traceback (most recent call last):
    ...
    microvm.errors.SandboxNotFound: no sandbox named 'missing'
    """


class SandboxExists(SandboxError):
    """A sandbox of that name already exists (pass ``replace=True`` to stop and replace it).

    >>> issubclass(SandboxExists, SandboxError)
    True
    >>> Sandbox.create("web", image=img, replace=True)   # doctest: +SKIP
    """


class SandboxNotRunning(SandboxError):
    """The sandbox is not running (stopped or crashed), so it cannot exec or serve files.

    ``state`` is its state; ``console_tail`` the last guest console lines when it crashed.

    >>> SandboxNotRunning("sandbox 'web' is stopped", state="stopped").state
    'stopped'
    >>> try:                                    # doctest: +SKIP
    ...     sb.exec("/bin/true")
    ... except SandboxNotRunning as e:
    ...     print(e.state, e.console_tail)
    """

    def __init__(self, message: str, state: str = "", console_tail: str = "") -> None:
        super().__init__(message)
        self.state = state
        self.console_tail = console_tail


class NoUplinkError(SandboxError):
    """The sandbox's policy allows egress but this process cannot build an uplink.

    >>> issubclass(NoUplinkError, SandboxError)
    True
    >>> Sandbox.create("x", image=img, network="none")   # doctest: +SKIP
    """


class DiskError(MicrovmError):
    """A guest disk image could not be built (bad source directory, size, or mkfs failure).

    >>> from pathlib import Path
    >>> from microvm import build_ext4
    >>> build_ext4(Path("/nonexistent/rootfs"), Path("/nonexistent/root.img"))
    Traceback (most recent call last):
    ...
    microvm.errors.DiskError: rootfs source '/nonexistent/rootfs' is not a directory
    """

class SnapshotError(MicrovmError):
    """A snapshot cannot be taken, restored, exported or imported (missing, corrupted,
    made for another kernel or image, or a machine that cannot be snapshotted).

    >>> issubclass(SnapshotError, MicrovmError)
    True
    >>> try:                                    # doctest: +SKIP
    ...     Machine.restore(Path("snap"))
    ... except SnapshotError as e:
    ...     print(e)     # snapshot 'snap': memory is 1048576 bytes, the manifest says 268435456
    """
