"""Exceptions raised by :mod:`microvm`; all derive from :class:`MicrovmError`."""

from __future__ import annotations


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
