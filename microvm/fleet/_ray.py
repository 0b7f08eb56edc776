"""The one place :mod:`microvm.fleet` imports Ray: :func:`require_ray`.

Example::

    from microvm.fleet._ray import require_ray
    ray = require_ray()          # RayUnavailable (naming the 'ray' extra) when missing
"""

from __future__ import annotations

from typing import Any

from microvm.fleet.errors import RayUnavailable

__all__ = ["require_ray"]


def require_ray() -> Any:
    """The ``ray`` module, or :class:`RayUnavailable` naming the extra to install.

    Typed ``Any``: fleet code talks to Ray's dynamic handles (actor classes, object refs).

    Example::

        ray = require_ray()
        print(ray.__version__)
    """
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(str(e)) from None
    return ray
