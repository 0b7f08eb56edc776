"""microvm.fleet: sandboxes across a Ray cluster (optional extra ``ray``).

* :class:`SandboxActor`: a Ray actor owning one sandbox on the node it lands on;
* :class:`RaySandboxPool`: ``size`` sandbox actors spread over the nodes that advertise
  the custom resource ``microvm`` (one unit per sandbox slot), with ``acquire`` /
  ``release`` and ``map`` (per-item timeouts, retries on another sandbox, dead sandboxes
  and nodes replaced, no duplicate results);
* ``microvm fleet node --slots N [--address HEAD]`` (:mod:`microvm.fleet._node`): checks
  this machine can run sandboxes, then ``ray start --resources '{"microvm": N}'``.

``import microvm`` never imports Ray, nor does ``import microvm.fleet``: the names below
load on first use, and without Ray that first use raises :class:`RayUnavailable`
("... pip install 'microvm-sandbox[ray]' (the 'ray' extra)"). The errors and the node
helpers work without Ray.

Example::

    from microvm.fleet import RaySandboxPool
    with RaySandboxPool("docker.io/library/busybox:1.36", 4, network="none") as pool:
        for r in pool.map("echo item $1", range(8)):
            print(r.index, r.unwrap().stdout_text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from microvm.fleet.errors import (
    FleetConfigError,
    FleetError,
    ItemFailed,
    NodeRefused,
    RayUnavailable,
)

if TYPE_CHECKING:
    from microvm.fleet._actor import SandboxActor, SealedSecrets
    from microvm.fleet._pool import MapResult, PooledSandbox, RaySandboxPool

#: public name -> submodule; these import Ray
_EXPORTS = {
    "SandboxActor": "_actor", "SealedSecrets": "_actor",
    "MapResult": "_pool", "PooledSandbox": "_pool", "RaySandboxPool": "_pool",
}


def __getattr__(name: str) -> Any:
    """Load a Ray-backed name on first use (PEP 562); :class:`RayUnavailable` without Ray.

    Example::

        import microvm.fleet
        pool_cls = microvm.fleet.RaySandboxPool
    """
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'microvm.fleet' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"microvm.fleet.{mod}"), name)
    globals()[name] = value
    return value


__all__ = [
    "FleetConfigError",
    "FleetError",
    "ItemFailed",
    "MapResult",
    "NodeRefused",
    "PooledSandbox",
    "RaySandboxPool",
    "RayUnavailable",
    "SandboxActor",
    "SealedSecrets",
]
