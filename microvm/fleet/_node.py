"""Node set-up for a fleet: check this machine can run sandboxes, then join Ray.

``microvm fleet node --slots N [--address HEAD]`` (:mod:`microvm.fleet._cli`) runs
:func:`node_problems` (Ray installed, then ``microvm doctor``'s checks: QEMU, the
accelerator, a guest kernel, the guest agent, ``$MICROVM_HOME``, and for networked
sandboxes the TAP uplink's ``/dev/net/tun`` plus root or CAP_NET_ADMIN); the first
problem refuses the join in one line (:class:`NodeRefused`).
Otherwise it sweeps this ``$MICROVM_HOME`` for stopped leftovers of fleet sandboxes
(:func:`sweep_home`: a node that died keeps its stopped records) and runs
``ray start`` (:func:`ray_start_argv`) with ``--resources '{"microvm": N}'`` (one unit per
sandbox slot); sandbox actors ask Ray for no CPU, so ``--num-cpus`` only sizes Ray's
own tasks. Nothing here imports Ray.

Example::

    from microvm.fleet._node import node_problems, ray_start_argv
    assert node_problems(network=False) == []
    print(ray_start_argv(4, address="10.0.0.1:6379"))
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

from microvm.fleet.errors import INSTALL_HINT, FleetConfigError, NodeRefused

__all__ = ["check_node", "join", "node_problems", "ray_start_argv", "sweep_home"]

#: the label every fleet sandbox carries (same as ``microvm.fleet._actor.POOL_LABEL``)
POOL_LABEL = "microvm.fleet.pool"


def node_problems(*, network: bool = True) -> list[str]:
    """Why this machine cannot run fleet sandboxes (empty: it can): Ray installed, then
    ``microvm doctor``'s required checks (QEMU, accelerator, kernel, guest agent,
    ``$MICROVM_HOME``), and with ``network`` its TAP uplink check (``/dev/net/tun`` and
    root or CAP_NET_ADMIN), each as ``"<check>: <found>; fix: <fix>"``.

    Example::

        for why in node_problems(network=False):
            print(why)
    """
    problems: list[str] = []
    if importlib.util.find_spec("ray") is None:
        problems.append(f"Ray is not installed; fix: {INSTALL_HINT}")
    from microvm._cli_doctor import doctor_checks

    for c in doctor_checks():
        if c.ok or not (c.required or (network and c.name == "tap uplink")):
            continue
        problems.append(f"{c.name}: {c.detail}" + (f"; fix: {c.fix}" if c.fix else ""))
    return problems


def check_node(*, network: bool = True) -> None:
    """Raise :class:`NodeRefused` with the first of :func:`node_problems`.

    Example::

        check_node(network=False)
    """
    problems = node_problems(network=network)
    if problems:
        raise NodeRefused(problems[0])


def ray_start_argv(slots: int, *, address: str | None = None, num_cpus: int | None = None,
                   port: int | None = None, node_ip_address: str | None = None,
                   object_store_bytes: int | None = None, temp_dir: str | None = None,
                   extra: Sequence[str] = ()) -> list[str]:
    """The ``ray start`` command line for a node with ``slots`` sandbox slots: a head
    when ``address`` is None, else a node joining the head at ``address``.

    Example::

        >>> ray_start_argv(2, address="10.0.0.1:6379", num_cpus=1)[-4:]
        ['--address', '10.0.0.1:6379', '--resources', '{"microvm": 2}']
    """
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 4096:
        raise FleetConfigError(f"bad --slots {slots!r}: an integer from 1 to 4096")
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int)
                                 or num_cpus < 0):
        raise FleetConfigError(f"bad --num-cpus {num_cpus!r}: an integer >= 0")
    if port is not None and not 1 <= port <= 65535:
        raise FleetConfigError(f"bad --port {port!r}: 1-65535")
    if address is not None and (not address or any(c.isspace() for c in address)):
        raise FleetConfigError(f"bad --address {address!r}: HOST:PORT of the head node")
    if address is not None and (port is not None or temp_dir is not None):
        raise FleetConfigError("--port and --temp-dir are for a head node (no --address): "
                               "a joining node uses the head's")
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--disable-usage-stats"]
    if address is None:
        argv += ["--head", "--include-dashboard=false"]
        if port is not None:
            argv += ["--port", str(port)]
        if temp_dir is not None:
            argv += ["--temp-dir", temp_dir]
    if num_cpus is not None:
        argv += ["--num-cpus", str(num_cpus)]
    if node_ip_address is not None:
        argv += ["--node-ip-address", node_ip_address]
    if object_store_bytes is not None:
        argv += ["--object-store-memory", str(object_store_bytes)]
    argv += list(extra)
    if address is not None:
        argv += ["--address", address]
    argv += ["--resources", json.dumps({"microvm": slots})]
    return argv


def sweep_home(*, pool_id: str | None = None) -> list[str]:
    """Remove fleet sandboxes in this ``$MICROVM_HOME``: those of pool ``pool_id`` (any
    state: their actors are gone), or with ``pool_id=None`` every fleet sandbox that is
    no longer running (left by a node or worker that died). Returns the names removed.

    Example::

        print(sweep_home())        # e.g. ['fleet-1a2b3c-4']
    """
    from microvm.errors import SandboxError
    from microvm.sandbox import Sandbox

    removed = []
    for info in Sandbox.list():
        owner = info.labels.get(POOL_LABEL)
        if owner is None or (pool_id is not None and owner != pool_id):
            continue
        if pool_id is None and info.state == "running":
            continue
        with contextlib.suppress(SandboxError):
            Sandbox.remove(info.name, timeout=5)
            removed.append(info.name)
    return removed


def join(slots: int, *, address: str | None = None, network: bool = True,
         num_cpus: int | None = None, port: int | None = None,
         node_ip_address: str | None = None, object_store_bytes: int | None = None,
         temp_dir: str | None = None, home: str | None = None,
         extra: Sequence[str] = (), env: Mapping[str, str] | None = None) -> int:
    """Check this node (:func:`check_node`), sweep leftovers, then run ``ray start``;
    returns its exit status. ``home`` sets ``$MICROVM_HOME`` for the node's sandboxes.

    Example::

        join(4, address="10.0.0.1:6379")
    """
    argv = ray_start_argv(slots, address=address, num_cpus=num_cpus, port=port,
                          node_ip_address=node_ip_address,
                          object_store_bytes=object_store_bytes, temp_dir=temp_dir,
                          extra=extra)
    child_env = dict(os.environ if env is None else env)
    if home is not None:
        os.makedirs(home, exist_ok=True)
        child_env["MICROVM_HOME"] = os.path.abspath(home)
        os.environ["MICROVM_HOME"] = child_env["MICROVM_HOME"]
    check_node(network=network)
    sweep_home()
    if shutil.which(argv[0]) is None and not os.path.exists(argv[0]):
        raise NodeRefused(f"{argv[0]} not found")
    return subprocess.run(argv, env=child_env, check=False).returncode
