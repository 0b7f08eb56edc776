"""Exceptions raised by :mod:`microvm`; all derive from :class:`MicrovmError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microvm.agent.protocol import ExecResult


class MicrovmError(Exception):
    """Base class of every error raised by microvm."""


class KernelError(MicrovmError):
    """The guest kernel (libkrunfw) could not be fetched, verified or converted."""


class BackendUnavailable(MicrovmError):
    """A VMM backend cannot run on this host (binary, library or KVM missing); the message says how to install it."""


class BootError(MicrovmError):
    """The guest did not come up; ``console_tail`` holds the last lines of the guest console.

    Example::

        try:
            machine.start()
        except BootError as e:
            print(e.console_tail)
    """

    def __init__(self, message: str, console_tail: str = "") -> None:
        full = message if not console_tail else f"{message}\n--- guest console (tail) ---\n{console_tail}"
        super().__init__(full)
        self.console_tail = console_tail


class AgentError(MicrovmError):
    """The guest agent refused a request or the agent channel failed.

    ``kind`` is the agent's error kind (e.g. ``"not_found"``, ``"bad_request"``,
    ``"connection_lost"``); ``errno`` / ``errno_name`` are set for OS-level failures.

    Example::

        try:
            await client.exec("/no/such/binary")
        except AgentError as e:
            assert e.kind == "not_found"
    """

    def __init__(self, message: str, kind: str = "other", errno: int = 0, errno_name: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.errno = errno
        self.errno_name = errno_name


class ExecTimeout(AgentError):
    """A command ran past its timeout; its process group was killed.

    ``result`` holds the output collected before the kill (an ``ExecResult``).

    Example::

        try:
            await client.exec("sleep", ["60"], timeout=1)
        except ExecTimeout as e:
            print(e.result.stdout)
    """

    def __init__(self, message: str, result: ExecResult | None = None) -> None:
        super().__init__(message, kind="timeout")
        self.result = result


class SandboxError(MicrovmError):
    """A sandbox operation failed (base of the ``Sandbox`` errors below).

    Example::

        try:
            Sandbox.get("nope")
        except SandboxError as e:
            print(e)
    """


class SandboxConfigError(SandboxError, ValueError):
    """An argument of ``Sandbox.create`` (or ``exec``) is invalid; raised before anything starts.

    Example::

        try:
            Sandbox.create("x", image="busybox", volumes={"/proc": "/tmp"})
        except SandboxConfigError as e:
            print(e)   # volume guest path '/proc' would shadow the system ...
    """


class SandboxNotFound(SandboxError, LookupError):
    """No sandbox of that name exists in ``$MICROVM_HOME/sandboxes.db``.

    Example::

        try:
            Sandbox.get("missing")
        except SandboxNotFound:
            pass
    """


class SandboxExists(SandboxError):
    """A sandbox of that name already exists (pass ``replace=True`` to stop and replace it).

    Example::

        Sandbox.create("web", image=img, replace=True)
    """


class SandboxNotRunning(SandboxError):
    """The sandbox is not running (stopped or crashed), so it cannot exec or serve files.

    ``state`` is its state; ``console_tail`` the last guest console lines when it crashed.

    Example::

        try:
            sb.exec("/bin/true")
        except SandboxNotRunning as e:
            print(e.state, e.console_tail)
    """

    def __init__(self, message: str, state: str = "", console_tail: str = "") -> None:
        super().__init__(message)
        self.state = state
        self.console_tail = console_tail


class NoUplinkError(SandboxError):
    """The sandbox's policy allows egress but this process cannot build an uplink.

    Example::

        Sandbox.create("x", image=img, network="none")   # works without one
    """


class SnapshotError(MicrovmError):
    """A snapshot cannot be taken, restored, exported or imported (missing, corrupted,
    made for another kernel or image, or a machine that cannot be snapshotted).

    Example::

        try:
            Machine.restore(Path("snap"))
        except SnapshotError as e:
            print(e)     # snapshot 'snap': memory is 1048576 bytes, the manifest says 268435456
    """
