"""Exceptions raised by :mod:`microvm.fleet`; all derive from :class:`FleetError`
(itself a :class:`microvm.errors.MicrovmError`). This module never imports Ray.

Example::

    from microvm.fleet.errors import FleetError
    try:
        pool.map("true", range(3))
    except FleetError as e:
        print(e)
"""

from __future__ import annotations

from microvm.errors import MicrovmError

__all__ = ["FleetConfigError", "FleetError", "ItemFailed", "NodeRefused", "RayUnavailable"]

#: the one line every "Ray is missing" error carries
INSTALL_HINT = "pip install 'microvm-sandbox[ray]' (the 'ray' extra)"


class FleetError(MicrovmError):
    """A fleet operation failed (base of the errors below).

    Example::

        >>> issubclass(RayUnavailable, FleetError)
        True
    """


class RayUnavailable(FleetError, ImportError):
    """Ray is not installed, so :mod:`microvm.fleet` cannot run; the message names the extra.

    Example::

        >>> str(RayUnavailable())
        "microvm.fleet needs Ray, which is not installed: pip install 'microvm-sandbox[ray]' (the 'ray' extra)"
    """

    def __init__(self, detail: str = "") -> None:
        why = f" ({detail})" if detail else ""
        super().__init__(f"microvm.fleet needs Ray, which is not installed{why}: {INSTALL_HINT}")


class FleetConfigError(FleetError, ValueError):
    """A fleet argument is invalid (raised before any sandbox starts).

    Example::

        >>> raise FleetConfigError("bad pool size 0: an integer from 1 to 1024")
        Traceback (most recent call last):
        ...
        microvm.fleet.errors.FleetConfigError: bad pool size 0: an integer from 1 to 1024
    """


class NodeRefused(FleetError):
    """This machine cannot run sandboxes, so ``microvm fleet node`` refuses to join.

    Example::

        >>> str(NodeRefused("QEMU is not installed (qemu-system-x86_64 not on PATH)"))
        'this node cannot run sandboxes: QEMU is not installed (qemu-system-x86_64 not on PATH)'
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"this node cannot run sandboxes: {reason}")
        self.reason = reason


class ItemFailed(FleetError):
    """One ``map`` item failed for good (after its retries); ``index`` and ``attempts`` say
    which and how often. :meth:`~microvm.fleet.MapResult.unwrap` raises it.

    Example::

        >>> e = ItemFailed(3, 2, "sandbox died")
        >>> (e.index, e.attempts, str(e))
        (3, 2, 'item 3 failed after 2 attempt(s): sandbox died')
    """

    def __init__(self, index: int, attempts: int, reason: str) -> None:
        super().__init__(f"item {index} failed after {attempts} attempt(s): {reason}")
        self.index = index
        self.attempts = attempts
        self.reason = reason
