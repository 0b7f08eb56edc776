"""Exceptions of :mod:`microvm.ssh` (all are :class:`~microvm.errors.MicrovmError`).

Example::

    from microvm.ssh import SshConfigError, read_public_key
    try:
        read_public_key("not a key")
    except SshConfigError as e:
        print(e)
"""

from __future__ import annotations

from microvm.errors import MicrovmError

__all__ = ["SshConfigError", "SshError"]


class SshError(MicrovmError):
    """An SSH operation failed (connection, authentication, channel).

    Example::

        try:
            client.exec("true")
        except SshError as e:
            print(e)
    """


class SshConfigError(SshError, ValueError):
    """A bad argument (key, listen address, timeout ...); raised before any slow work.

    Example::

        try:
            SshServer("demo", idle_timeout=-1)
        except SshConfigError as e:
            print(e)   # bad idle_timeout -1: seconds > 0 or None
    """
