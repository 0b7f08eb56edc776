"""``RaySandboxPool``: ``size`` sandbox actors spread over a Ray cluster's ``microvm`` nodes.

Placement: the pool reads the alive nodes that advertise the custom resource ``microvm``
(``microvm fleet node --slots N`` gives a node N units, one per sandbox slot), caps each
at ``per_node`` if given, and deals the sandboxes out round-robin (most free slots
first), pinning each actor to its node (hard node affinity) and holding one ``microvm``
unit for it. A pool larger than the slots of the cluster is refused before anything
starts.

``map(fn_or_cmd, items)`` runs one item at a time per sandbox and yields a
:class:`MapResult` per item as it finishes (``ordered=True``: in input order):

* an attempt that times out (``timeout`` per item, inside the guest, plus a grace on
  the driver's side for a wedged sandbox or node) or whose sandbox or node died is
  retried on another sandbox, at most ``max_retries`` times; a sandbox that died, or
  stopped answering, is killed and recreated (on any node with a free slot);
* an exception raised by the callable (or a command's non-zero exit, which is just its
  ``ExecOutput``) is the item's result, not retried;
* every item is reported exactly once: a late answer of an abandoned attempt is dropped.

``close()`` stops and removes every sandbox of the pool, kills its actors, then runs a
sweep on every alive ``microvm`` node that removes any sandbox still labelled with the
pool's id (one whose actor died). A node that died takes its sandboxes down with it
(their supervisors stop when the actor's process dies); its ``$MICROVM_HOME`` keeps the
stopped records until ``microvm fleet node`` next starts there (it sweeps them).

Example::

    from microvm.fleet import RaySandboxPool
    with RaySandboxPool("docker.io/library/busybox:1.36", 4, network="none",
                        memory=256) as pool:
        for r in pool.map("echo $1", ["a", "b", "c"]):
            print(r.index, r.node_id, r.unwrap().stdout_text)
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from microvm.fleet._actor import POOL_LABEL, SandboxActor, SealedSecrets
from microvm.fleet._ray import require_ray
from microvm.fleet.errors import FleetConfigError, FleetError, ItemFailed

if TYPE_CHECKING:
    from microvm.sandbox import DnsOptions, ExecOutput, TlsOptions
    from rootfs import Image
    from tls_proxy import Secret

ray = require_ray()
log = logging.getLogger("microvm.fleet")

__all__ = ["MapResult", "PooledSandbox", "RaySandboxPool"]

#: the driver waits this long past an item's ``timeout`` before it gives the sandbox up
DRIVER_GRACE = 15.0
#: consecutive failed sandbox starts after which the pool stops trying
MAX_START_FAILURES = 6
#: a node where Ray lost a sandbox actor gets no new sandbox for this long (seconds)
SUSPECT_SECONDS = 30.0


@dataclass(frozen=True)
class MapResult:
    """One ``map`` item's outcome: ``value`` (the ``ExecOutput`` of a command, or what the
    callable returned) or ``error``; ``attempts``, and where the last attempt ran.

    Example::

        >>> r = MapResult(0, "x", value=42)
        >>> r.ok, r.unwrap()
        (True, 42)
    """

    index: int
    item: Any
    value: Any = None
    error: str | None = None
    attempts: int = 1
    node_id: str = ""
    sandbox: str = ""

    @property
    def ok(self) -> bool:
        """True when the item produced a value.

        Example::

            >>> MapResult(1, "y", error="boom").ok
            False
        """
        return self.error is None

    def unwrap(self) -> Any:
        """The value, or :class:`ItemFailed` with the error.

        Example::

            >>> MapResult(2, "z", value="v").unwrap()
            'v'
        """
        if self.error is not None:
            raise ItemFailed(self.index, self.attempts, self.error)
        return self.value


@dataclass(frozen=True)
class PooledSandbox:
    """A sandbox handed out by :meth:`RaySandboxPool.acquire`: its ``name``, Ray
    ``node_id`` and ``actor`` (a :data:`~microvm.fleet.SandboxActor` handle; call any of
    its methods with ``.remote``). :meth:`exec` / :meth:`shell` are blocking shortcuts.

    Example::

        sb = pool.acquire()
        print(sb.shell("hostname").stdout_text, sb.node_id)
        pool.release(sb)
    """

    name: str
    node_id: str
    actor: Any

    def exec(self, cmd: str, args: Sequence[str] = (), *, timeout: float | None = None
             ) -> ExecOutput:
        """Run ``cmd args`` in the sandbox and wait for its output.

        Example::

            sb.exec("/bin/echo", ["hi"]).stdout_text
        """
        out: ExecOutput = ray.get(self.actor.exec.remote(cmd, list(args), timeout=timeout))
        return out

    def shell(self, script: str, *, timeout: float | None = None) -> ExecOutput:
        """Run ``script`` with the sandbox's shell and wait for its output.

        Example::

            sb.shell("echo $((6*7))").stdout_text
        """
        out: ExecOutput = ray.get(self.actor.shell.remote(script, timeout=timeout))
        return out


@dataclass
class _Slot:
    key: int
    name: str
    node_id: str
    actor: Any
    state: str                      # starting | idle | busy | leased | dead
    start_ref: Any = None


@dataclass
class _Attempt:
    slot: _Slot
    index: int
    deadline: float


def _ray_errors() -> tuple[type[BaseException], ...]:
    ex = ray.exceptions
    return (ex.RayActorError, ex.WorkerCrashedError, ex.NodeDiedError, ex.ObjectLostError,
            ex.OwnerDiedError, ex.LocalRayletDiedError, ex.ActorUnschedulableError)


class RaySandboxPool:
    """``size`` sandboxes kept ready across the cluster (see the module docstring).

    ``image`` and the sandbox settings (``cpus``, ``memory``, ``env``, ``workdir``,
    ``user``, ``hostname``, ``labels``, ``network``, ``secrets``, ``dns``, ``tls``,
    ``max_duration``, ``idle_timeout``, ``pull_policy``, ``registry_*``,
    ``boot_timeout``) mean what they mean for ``Sandbox.create`` and are validated here,
    before anything starts; every node resolves ``image`` in its own store (a registry
    reference, or a local reference present on every node). ``per_node`` caps the
    sandboxes per node; ``item_timeout`` and ``max_retries`` are ``map``'s defaults.
    ``address``: the cluster to join when Ray is not initialized yet (``"auto"`` by
    default); ``wait``: block until all ``size`` sandboxes answer.

    Secrets are validated, then stored once in the job's object store; actors get a
    reference (see :class:`~microvm.fleet.SealedSecrets`).

    Example::

        pool = RaySandboxPool("docker.io/library/busybox:1.36", 2, network="none")
        sb = pool.acquire(); print(sb.shell("echo hi").stdout_text); pool.release(sb)
        pool.close()
    """

    def __init__(
        self,
        image: str | Image | os.PathLike[str],
        size: int,
        *,
        per_node: int | None = None,
        name: str = "fleet",
        cpus: int = 1,
        memory: int = 512,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        hostname: str | None = None,
        labels: Mapping[str, str] | None = None,
        network: object = None,
        secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
        dns: DnsOptions | None = None,
        tls: TlsOptions | None = None,
        max_duration: float | str | None = None,
        idle_timeout: float | str | None = None,
        pull_policy: str = "if-missing",
        registry_insecure: bool = False,
        registry_ca_certs: str | Sequence[str] | None = None,
        boot_timeout: float = 120.0,
        item_timeout: float = 600.0,
        max_retries: int = 2,
        address: str | None = None,
        wait: bool = True,
    ) -> None:
        from microvm.fleet._actor import secret_dicts
        from microvm.sandbox._config import SandboxConfig, validate_name

        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
            raise FleetConfigError(f"bad pool size {size!r}: an integer from 1 to 4096")
        if per_node is not None and (isinstance(per_node, bool) or not isinstance(per_node, int)
                                     or per_node < 1):
            raise FleetConfigError(f"bad per_node {per_node!r}: None or an integer >= 1")
        _check_retries(max_retries)
        _check_timeout(item_timeout)
        validate_name(name)
        if len(name) > 40:
            raise FleetConfigError(f"bad pool name {name!r}: at most 40 characters "
                                   f"(sandbox names append a suffix)")
        self.name = name
        self.id = f"{name}-{uuid.uuid4().hex[:6]}"
        self.size = size
        self.per_node = per_node
        self.item_timeout = float(item_timeout)
        self.max_retries = max_retries
        all_labels = {**(labels or {}), POOL_LABEL: self.id}
        secret_items = secret_dicts(secrets)          # validated (values stay here)
        if not isinstance(image, str | os.PathLike):
            from rootfs import Image as _Image

            if not isinstance(image, _Image):
                raise FleetConfigError(f"image must be a reference, a directory or a "
                                       f"rootfs.Image, got {type(image).__name__}")
        # every sandbox argument validated now, before any slow work
        from microvm.sandbox._config import parse_secrets

        SandboxConfig.build(
            f"{self.id}-0", image=os.fspath(image) if isinstance(image, os.PathLike) else
            (image if isinstance(image, str) else image.ref),
            image_kind=None if isinstance(image, str) else
            ("dir" if isinstance(image, os.PathLike) else "object"),
            cpus=cpus, memory=memory, env=env, workdir=workdir, user=user,
            hostname=hostname, labels=all_labels, network=network,
            secrets=parse_secrets(secret_items), pull_policy=pull_policy,
            registry_insecure=registry_insecure, registry_ca_certs=registry_ca_certs,
            max_duration=max_duration, idle_timeout=idle_timeout, dns=dns, tls=tls)
        if not isinstance(boot_timeout, int | float) or boot_timeout <= 0:
            raise FleetConfigError(f"bad boot_timeout {boot_timeout!r}: seconds > 0")
        self._boot_timeout = float(boot_timeout)
        self._own_ray = False
        self._suspect: dict[str, float] = {}
        if not ray.is_initialized():
            try:
                ray.init(address=address or "auto", logging_level=logging.WARNING,
                         configure_logging=False)
            except (ConnectionError, ValueError) as e:
                raise FleetError(f"cannot join the Ray cluster at {address or 'auto'!r}: "
                                 f"{_first_line(e)} (start one with `microvm fleet node "
                                 f"--slots N`)") from None
            self._own_ray = True
        capacity = self._capacity()
        total = sum(capacity.values())
        if total < size:
            self._shutdown_ray()
            raise FleetConfigError(
                f"pool size {size} exceeds the {total} sandbox slot(s) of the "
                f"{len(capacity)} alive node(s) advertising the 'microvm' resource "
                f"(start more with `microvm fleet node --slots N`)")
        self._sealed = SealedSecrets.seal(secret_items)
        self._create: dict[str, Any] = dict(
            image=image, cpus=cpus, memory=memory, env=env, workdir=workdir, user=user,
            hostname=hostname, labels=all_labels, network=network, secrets=self._sealed,
            dns=dns, tls=tls, max_duration=max_duration, idle_timeout=idle_timeout,
            pull_policy=pull_policy, registry_insecure=registry_insecure,
            registry_ca_certs=registry_ca_certs, boot_timeout=float(boot_timeout))
        self._lock = threading.RLock()
        self._slots: dict[int, _Slot] = {}
        self._seq = 0
        self._closed = False
        self._start_failures = 0
        self._last_error = ""
        self._deficit = 0
        self._last_refill = 0.0
        try:
            for node in self._placement(size, capacity):
                self._spawn(node)
            if wait:
                self.wait_ready(timeout=self._boot_timeout * 2 + 60)
        except BaseException:
            self.close()
            raise

    # -- nodes and placement -------------------------------------------------------------
    def _capacity(self) -> dict[str, int]:
        """Alive node id -> the sandbox slots it advertises (capped by ``per_node``)."""
        out: dict[str, int] = {}
        now = time.monotonic()
        for n in ray.nodes():
            slots = int(n.get("Resources", {}).get("microvm", 0))
            if self._suspect.get(str(n["NodeID"]), 0.0) > now:
                continue            # a sandbox there just died: maybe the node did
            if n.get("Alive") and slots >= 1:
                out[str(n["NodeID"])] = min(slots, self.per_node or slots)
        return out

    def _placement(self, count: int, capacity: Mapping[str, int]) -> list[str]:
        """``count`` node ids, spread evenly: each goes to the node with a free slot that
        runs the fewest of this pool's sandboxes (ties: the most free slots)."""
        used = collections.Counter(s.node_id for s in self._live())
        free = {n: c - used.get(n, 0) for n, c in capacity.items()}
        out: list[str] = []
        for _ in range(count):
            open_nodes = sorted(n for n in free if free[n] > 0)
            if not open_nodes:
                break
            best = max(open_nodes, key=lambda n: (-used[n], free[n]))
            out.append(best)
            free[best] -= 1
            used[best] += 1
        return out

    def _live(self) -> list[_Slot]:
        return [s for s in self._slots.values() if s.state != "dead"]

    def _spawn(self, node_id: str) -> _Slot:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        with self._lock:
            self._seq += 1
            key = self._seq
            name = f"{self.id}-{key}"
            actor = SandboxActor.options(
                name=None, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(name, **self._create)
            slot = _Slot(key, name, node_id, actor, "starting", actor.start.remote())
            self._slots[key] = slot
            return slot

    def _finish_start(self, slot: _Slot) -> None:
        """Collect a finished start: the slot becomes idle, or dead (and is replaced)."""
        if slot.state != "starting" or slot.start_ref is None:
            return                  # already collected (by map and acquire both waiting)
        try:
            ray.get(slot.start_ref)
        except Exception as e:
            log.warning("fleet %s: sandbox %s did not start: %s", self.id, slot.name,
                        _first_line(e))
            self._last_error = _first_line(e)
            self._start_failures += 1
            self._retire(slot, suspect=isinstance(e, _ray_errors()))
            return
        slot.start_ref = None
        self._start_failures = 0
        slot.state = "idle" if not self._closed else slot.state

    def _retire(self, slot: _Slot, *, replace: bool = True, suspect: bool = False) -> None:
        """Forget a sandbox that died or stopped answering (killed); start a new one.
        ``suspect``: Ray lost the actor, so its node may be dying too: place nothing
        there for :data:`SUSPECT_SECONDS` (Ray marks a dead node only after its health
        checks time out)."""
        if suspect:
            self._suspect[slot.node_id] = time.monotonic() + SUSPECT_SECONDS
        slot.state = "dead"
        slot.start_ref = None
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)
        if replace and not self._closed:
            self._deficit += 1
            self._refill(force=True)

    def _refill(self, *, force: bool = False) -> None:
        """Start replacements for retired sandboxes where a node has a free slot."""
        if self._deficit <= 0 or self._closed:
            return
        if self._start_failures >= MAX_START_FAILURES:
            return
        now = time.monotonic()
        if not force and now - self._last_refill < 2.0:
            return
        self._last_refill = now
        for node in self._placement(self._deficit, self._capacity()):
            self._spawn(node)
            self._deficit -= 1

    def nodes(self) -> dict[str, int]:
        """Ray node id -> how many of the pool's sandboxes run (or start) there.

        Example::

            print(pool.nodes())      # {'5c1f...': 2, '9a0e...': 2}
        """
        with self._lock:
            return dict(collections.Counter(s.node_id for s in self._live()))

    # -- waiting -----------------------------------------------------------------------
    def _starting(self) -> list[_Slot]:
        return [s for s in self._slots.values() if s.state == "starting"]

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` for a start to finish and collect every finished one."""
        with self._lock:
            starting = {s.start_ref: s for s in self._starting()}
        if not starting:
            time.sleep(min(timeout, 0.5))
        else:
            ready, _ = ray.wait(list(starting), num_returns=1, timeout=timeout)
            with self._lock:
                for ref in ready:
                    self._finish_start(starting[ref])
        with self._lock:
            self._refill()

    def _raise_if_stuck(self) -> None:
        if self._closed:
            raise FleetError(f"fleet pool {self.id!r} is closed")
        if not self._live() and (self._start_failures >= MAX_START_FAILURES
                                 or not self._capacity()):
            raise FleetError(f"fleet pool {self.id!r}: no sandbox could be started"
                             + (f" (last error: {self._last_error})" if self._last_error else ""))

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until ``size`` sandboxes answer; :class:`FleetError` on timeout or when
        starts keep failing.

        Example::

            pool.wait_ready()
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                ready = [s for s in self._live() if s.state in ("idle", "busy", "leased")]
                if len(ready) >= self.size:
                    return
                self._raise_if_stuck()
                if self._start_failures >= MAX_START_FAILURES:
                    raise FleetError(f"fleet pool {self.id!r}: {self._start_failures} sandbox "
                                     f"starts failed in a row (last: {self._last_error})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise FleetError(f"fleet pool {self.id!r}: {len(ready)} of {self.size} "
                                 f"sandboxes ready after {timeout:g}s")
            self._pump(min(left, 1.0))

    # -- acquire / release ---------------------------------------------------------------
    def _take_idle(self, avoid: int | None = None) -> _Slot | None:
        idle = [s for s in self._slots.values() if s.state == "idle"]
        if not idle:
            return None
        pick = next((s for s in idle if s.key != avoid), idle[0])
        return pick

    def acquire(self, timeout: float = 300.0) -> PooledSandbox:
        """Hand out a ready sandbox for exclusive use (``map`` does not use it until
        :meth:`release`); waits up to ``timeout`` for one.

        Example::

            sb = pool.acquire()
        """
        _check_timeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._raise_if_stuck()
                slot = self._take_idle()
                if slot is not None:
                    slot.state = "leased"
                    return PooledSandbox(slot.name, slot.node_id, slot.actor)
            left = deadline - time.monotonic()
            if left <= 0:
                raise FleetError(f"fleet pool {self.id!r}: no sandbox free within {timeout:g}s")
            self._pump(min(left, 1.0))

    def release(self, sandbox: PooledSandbox, *, recreate: bool = False) -> None:
        """Give back a sandbox from :meth:`acquire`; ``recreate=True`` replaces it with a
        fresh one (its state is discarded).

        Example::

            pool.release(sb)
        """
        with self._lock:
            slot = next((s for s in self._slots.values() if s.name == sandbox.name), None)
            if slot is None or slot.state != "leased":
                raise FleetConfigError(f"sandbox {sandbox.name!r} is not handed out by pool "
                                       f"{self.id!r}")
            if recreate:
                with contextlib.suppress(Exception):
                    ray.get(slot.actor.stop.remote(), timeout=60)
                self._retire(slot)
            else:
                slot.state = "idle"

    # -- map -----------------------------------------------------------------------------
    def map(self, fn_or_cmd: str | Callable[..., Any], items: Iterable[Any], *,
            ordered: bool = False, timeout: float | None = None,
            max_retries: int | None = None) -> Iterator[MapResult]:
        """Run ``fn_or_cmd`` against a sandbox per item; yield a :class:`MapResult` per
        item as it finishes (``ordered=True``: in input order).

        A string is a shell script, the item its ``$1`` (value: ``ExecOutput``); a
        callable gets ``(sandbox, item)`` on the sandbox's node (an ``AsyncSandbox`` if
        it is ``async def``, else a blocking ``Sandbox``) and must be picklable.
        ``timeout`` (default ``item_timeout``) bounds each attempt; ``max_retries``
        (default the pool's) bounds the retries after a timeout or a dead sandbox/node.

        Example::

            for r in pool.map(lambda sb, x: sb.shell(f"echo {x}").stdout_text, range(4)):
                print(r.index, r.value)
        """
        if isinstance(fn_or_cmd, str):
            if not fn_or_cmd.strip():
                raise FleetConfigError("map: the command is empty; give a shell script "
                                       "(the item is $1) or a callable (sandbox, item)")
        elif not callable(fn_or_cmd):
            raise FleetConfigError(f"map: fn_or_cmd must be a shell script or a callable "
                                   f"(sandbox, item), got {type(fn_or_cmd).__name__}")
        item_timeout = self.item_timeout if timeout is None else timeout
        _check_timeout(item_timeout)
        retries = self.max_retries if max_retries is None else max_retries
        _check_retries(retries)
        return self._map(fn_or_cmd, list(items), ordered, float(item_timeout), retries)

    def _map(self, fn: str | Callable[..., Any], items: list[Any], ordered: bool,
             timeout: float, retries: int) -> Iterator[MapResult]:
        payload = fn if isinstance(fn, str) else ray.put(fn)
        pending: collections.deque[int] = collections.deque(range(len(items)))
        attempts = [0] * len(items)
        last_slot: list[int | None] = [None] * len(items)
        inflight: dict[Any, _Attempt] = {}
        done: set[int] = set()
        held: dict[int, MapResult] = {}
        out: list[MapResult] = []           # ready to yield (never yielded under the lock)
        next_out = 0
        errors = _ray_errors()

        def finish(res: MapResult) -> None:
            nonlocal next_out
            if res.index in done:            # a late duplicate: never reported twice
                return
            done.add(res.index)
            if not ordered:
                out.append(res)
                return
            held[res.index] = res
            while next_out in held:
                out.append(held.pop(next_out))
                next_out += 1

        def result(i: int, slot: _Slot, value: Any = None, error: str | None = None
                   ) -> None:
            finish(MapResult(i, items[i], value=value, error=error, attempts=attempts[i],
                             node_id=slot.node_id, sandbox=slot.name))

        def failed(i: int, slot: _Slot, why: str) -> None:
            if attempts[i] <= retries:
                pending.appendleft(i)        # retried first, on another sandbox
            else:
                result(i, slot, error=why)

        try:
            while len(done) < len(items):
                with self._lock:
                    if self._closed:
                        raise FleetError(f"fleet pool {self.id!r} was closed during map")
                    while pending:
                        slot = self._take_idle(avoid=last_slot[pending[0]])
                        if slot is None:
                            break
                        i = pending.popleft()
                        attempts[i] += 1
                        last_slot[i] = slot.key
                        slot.state = "busy"
                        ref = slot.actor.run_item.remote(payload, items[i], timeout)
                        inflight[ref] = _Attempt(slot, i, time.monotonic() + timeout +
                                                 DRIVER_GRACE)
                    if pending and not inflight and not self._starting():
                        self._refill(force=True)
                        now = time.monotonic()
                        waiting = any(t > now for t in self._suspect.values())
                        if not self._starting() and not waiting and not [
                                s for s in self._slots.values() if s.state == "idle"]:
                            why = ("no sandbox left to run on"
                                   + (f" (last start error: {self._last_error})"
                                      if self._last_error else ""))
                            while pending:
                                i = pending.popleft()
                                finish(MapResult(i, items[i], error=why,
                                                 attempts=attempts[i]))
                    starting = {s.start_ref: s for s in self._starting()}
                yield from out
                out.clear()
                if len(done) >= len(items):
                    break
                now = time.monotonic()
                wait_for = list(inflight) + list(starting)
                if not wait_for:             # nothing to wait on yet: a node is suspect
                    time.sleep(0.5)
                    with self._lock:
                        self._refill()
                    continue
                nearest = min((a.deadline for a in inflight.values()), default=now + 1.0)
                ready, _ = ray.wait(wait_for, num_returns=1,
                                    timeout=max(0.0, min(nearest - now, 1.0)))
                with self._lock:
                    for ref in ready:
                        if ref in starting:
                            self._finish_start(starting[ref])
                            continue
                        att = inflight.pop(ref)
                        slot, i = att.slot, att.index
                        try:
                            status, value = ray.get(ref)
                        except errors as e:
                            self._retire(slot, suspect=True)
                            failed(i, slot, f"sandbox {slot.name} or its node died: "
                                            f"{_first_line(e)}")
                            continue
                        except Exception as e:    # the actor method itself failed
                            if slot.state == "busy":
                                slot.state = "idle"
                            result(i, slot, error=_first_line(e))
                            continue
                        if status == "dead":
                            self._retire(slot, suspect=True)
                            failed(i, slot, value)
                            continue
                        if slot.state == "busy":
                            slot.state = "idle"
                        if status == "timeout":
                            failed(i, slot, value)
                        elif status == "error":
                            result(i, slot, error=value)
                        else:
                            result(i, slot, value=value)
                    now = time.monotonic()
                    for ref, att in list(inflight.items()):
                        if now >= att.deadline:    # wedged sandbox or unreachable node
                            del inflight[ref]
                            with contextlib.suppress(Exception):
                                ray.cancel(ref, force=False)
                            self._retire(att.slot, suspect=True)
                            failed(att.index, att.slot,
                                   f"no answer from sandbox {att.slot.name} within "
                                   f"{timeout + DRIVER_GRACE:g}s")
                    self._refill()
                yield from out
                out.clear()
        finally:
            with self._lock:
                for att in inflight.values():       # abandoned (generator closed early)
                    if att.slot.state == "busy":
                        self._retire(att.slot)

    # -- close -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop and remove every sandbox of the pool on every node, kill its actors, and
        sweep every alive ``microvm`` node for leftovers labelled with the pool's id.

        Example::

            pool.close()
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots = [s for s in self._slots.values() if s.state != "dead"]
            dead = [s for s in self._slots.values() if s.state == "dead"]
        stops = {}
        for s in slots:
            with contextlib.suppress(Exception):
                stops[s.actor.stop.remote()] = s
        if stops:
            with contextlib.suppress(Exception):
                ray.wait(list(stops), num_returns=len(stops), timeout=90)
        for s in slots + dead:
            with contextlib.suppress(Exception):
                ray.kill(s.actor, no_restart=True)
            s.state = "dead"
        self._sweep()
        self._sealed = SealedSecrets([], self._sealed.envs)   # drop the object reference
        self._shutdown_ray()

    def _sweep(self) -> None:
        """Remove leftovers labelled with this pool's id on every alive microvm node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = []
        for node in self._capacity():
            with contextlib.suppress(Exception):
                refs.append(_sweep_task.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                ).remote(self.id))
        for ref in refs:
            try:
                removed = ray.get(ref, timeout=120)
            except Exception as e:
                log.warning("fleet %s: sweep failed on a node: %s", self.id, _first_line(e))
                continue
            if removed:
                log.info("fleet %s: swept %s", self.id, removed)

    def _shutdown_ray(self) -> None:
        if self._own_ray:
            self._own_ray = False
            with contextlib.suppress(Exception):
                ray.shutdown()

    def __enter__(self) -> RaySandboxPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RaySandboxPool({self.id!r}, size={self.size})"


def _sweep(pool_id: str) -> list[str]:
    from microvm.fleet._node import sweep_home

    return sweep_home(pool_id=pool_id)


_sweep_task: Any = ray.remote(num_cpus=0, max_retries=0)(_sweep)


def _check_retries(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FleetConfigError(f"bad max_retries {value!r}: an integer >= 0")


def _check_timeout(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise FleetConfigError(f"bad timeout {value!r}: seconds > 0")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
