"""``SandboxActor``: a Ray actor that owns one sandbox on the node it lands on.

The actor is an asyncio actor holding an :class:`~microvm.AsyncSandbox` created with the
arguments of ``Sandbox.create`` (the subset that makes sense across machines: no host
objects such as uplink factories or ``rootfs.Patch`` lists). The sandbox is created by
:meth:`~SandboxActorImpl.start` (or on first use) in the node's own ``$MICROVM_HOME``
(the environment the node's raylet was started with), as an attached sandbox: when the
actor's worker process dies, its supervisor sees the lifeline close and stops the VM
and its network. A watchdog also stops the sandbox and exits when the worker loses its
raylet (the node died).

Secrets: pass :class:`SealedSecrets` (``SealedSecrets.seal(secrets)``): the values go
into the job's object store once (``ray.put``); the actor's creation arguments then
carry only an object reference, so the values appear in no task specification, GCS
table, log line or ``repr``.

Default options: ``resources={"microvm": 1}`` (one slot of a ``microvm fleet node``),
``num_cpus=0``, ``max_restarts=0`` (the pool recreates sandboxes itself).

Example::

    import ray
    from microvm.fleet import SandboxActor
    a = SandboxActor.remote("job-1", image="docker.io/library/busybox:1.36", network="none")
    print(ray.get(a.start.remote())["node_id"])
    print(ray.get(a.shell.remote("echo hi")).stdout_text)
    for ref in a.exec_stream.remote("/bin/echo", ["streamed"]):
        print(ray.get(ref).kind)
    ray.get(a.stop.remote())
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from microvm.errors import AgentError, ExecTimeout, SandboxNotRunning
from microvm.fleet._ray import require_ray
from microvm.fleet.errors import FleetError

if TYPE_CHECKING:
    from microvm.agent import ExecEvent
    from microvm.sandbox import AsyncSandbox, DnsOptions, ExecOutput, TlsOptions
    from rootfs import Image
    from tls_proxy import Secret

ray = require_ray()

__all__ = ["SandboxActor", "SandboxActorImpl", "SealedSecrets", "secret_dicts"]

#: label every fleet sandbox carries (value: the pool id); sweeps look for it
POOL_LABEL = "microvm.fleet.pool"
#: how often the watchdog checks the worker still has its raylet (seconds)
WATCHDOG_PERIOD = 1.0


def secret_dicts(secrets: Sequence[Secret | Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Validate ``secrets`` (as ``Sandbox.create`` does) into plain picklable dicts
    (``tls_proxy.Secret`` refuses to be pickled). Errors name the env, never the value.

    Example::

        >>> [d["env"] for d in secret_dicts([{"env": "K", "value": "v", "host": "a.example"}])]
        ['K']
    """
    from microvm.sandbox._config import parse_secrets

    return [{"env": s.env, "value": s.value, "hosts": [str(h) for h in s.hosts],
             "placeholder": s.placeholder, "inject": list(s.inject)}
            for s in parse_secrets(secrets)]


class SealedSecrets:
    """Secret values held in the Ray object store of this job, passed by reference.

    ``seal`` validates them and ``ray.put``\\ s them once; pickling this object (as an
    actor argument) carries only the object reference. ``envs`` names them; ``repr``
    never shows a value.

    Example::

        sealed = SealedSecrets.seal([{"env": "TOKEN", "value": "s3cret", "host": "api.example.com"}])
        actor = SandboxActor.remote("x", image=img, secrets=sealed)
    """

    def __init__(self, refs: list[Any], envs: tuple[str, ...]) -> None:
        self._refs = refs           # a list: Ray never resolves a nested reference for us
        self.envs = envs

    @classmethod
    def seal(cls, secrets: Sequence[Secret | Mapping[str, Any]] | None) -> SealedSecrets:
        """Validate and store ``secrets`` in the object store (needs ``ray.init`` first).

        Example::

            sealed = SealedSecrets.seal([{"env": "K", "value": "v", "host": "a.example"}])
        """
        items = secret_dicts(secrets)
        envs = tuple(d["env"] for d in items)
        return cls([ray.put(items)] if items else [], envs)

    async def values(self) -> list[dict[str, Any]]:
        """The secrets as dicts (fetched from the object store; call it where they are used).

        Example::

            items = await sealed.values()
        """
        out: list[dict[str, Any]] = []
        for ref in self._refs:
            out.extend(await ref)
        return out

    def __repr__(self) -> str:
        return f"SealedSecrets(envs={list(self.envs)!r})"


class SandboxActorImpl:
    """The class behind :data:`SandboxActor` (see the module docstring): one sandbox,
    created with ``Sandbox.create``'s arguments, served through async actor methods.

    Example::

        a = SandboxActor.remote("job-1", image="docker.io/library/busybox:1.36",
                                network="none", memory=256)
        out = ray.get(a.exec.remote("/bin/echo", ["hi"]))
    """

    def __init__(
        self,
        name: str,
        *,
        image: str | Image | os.PathLike[str],
        cpus: int = 1,
        memory: int = 512,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        shell: str | None = None,
        user: str | None = None,
        hostname: str | None = None,
        labels: Mapping[str, str] | None = None,
        network: object = None,
        secrets: SealedSecrets | Sequence[Secret | Mapping[str, Any]] | None = None,
        dns: DnsOptions | None = None,
        tls: TlsOptions | None = None,
        max_duration: float | str | None = None,
        idle_timeout: float | str | None = None,
        rlimits: Mapping[str, int | tuple[int | None, int | None] | None] | None = None,
        pull_policy: str = "if-missing",
        registry_insecure: bool = False,
        registry_ca_certs: str | Sequence[str] | None = None,
        upper_size_mib: int = 4096,
        backend: str = "qemu",
        boot_timeout: float = 120.0,
        replace: bool = False,
    ) -> None:
        from microvm.sandbox._config import validate_name

        self.name = validate_name(name)
        if isinstance(secrets, SealedSecrets) or secrets is None:
            self._sealed: SealedSecrets | None = secrets
            self._plain: list[dict[str, Any]] = []
        else:
            self._sealed, self._plain = None, secret_dicts(secrets)
        self._create: dict[str, Any] = dict(
            image=image, cpus=cpus, memory=memory, env=env, workdir=workdir, shell=shell,
            user=user, hostname=hostname, labels=labels, network=network, dns=dns, tls=tls,
            max_duration=max_duration, idle_timeout=idle_timeout, rlimits=rlimits,
            pull_policy=pull_policy, registry_insecure=registry_insecure,
            registry_ca_certs=registry_ca_certs, upper_size_mib=upper_size_mib,
            backend=backend, boot_timeout=boot_timeout, replace=replace)
        self._sb: AsyncSandbox | None = None
        self._lock: asyncio.Lock | None = None
        self._stopped = False
        self._parent = os.getppid()
        self._watchdog: asyncio.Task[None] | None = None
        self._blocking: Any = None

    def __repr__(self) -> str:      # Ray prefixes the actor's log lines with it
        return f"SandboxActor({self.name})"

    # -- the sandbox -------------------------------------------------------------------
    async def _sandbox(self) -> AsyncSandbox:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._stopped:
                raise FleetError(f"sandbox actor {self.name!r} was stopped")
            if self._sb is None:
                from microvm.sandbox import AsyncSandbox

                secrets = await self._sealed.values() if self._sealed else self._plain
                self._sb = await AsyncSandbox.create(self.name, secrets=secrets or None,
                                                     **self._create)
                self._watchdog = asyncio.get_running_loop().create_task(self._watch())
            return self._sb

    async def _watch(self) -> None:
        """Stop the sandbox and exit when the worker lost its raylet (re-parented)."""
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD)
            if os.getppid() != self._parent:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._teardown(), 30)
                os._exit(1)

    async def start(self) -> dict[str, Any]:
        """Create the sandbox (if not yet) and say where it runs: ``name``, ``node_id``
        (Ray's), ``pid`` (the worker), ``home`` (the node's ``$MICROVM_HOME``).

        Example::

            info = ray.get(actor.start.remote())
        """
        await self._sandbox()
        from rootfs import microvm_home

        return {"name": self.name, "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "home": str(microvm_home())}

    async def node_id(self) -> str:
        """The Ray node id this actor (and its sandbox) lives on.

        Example::

            ray.get(actor.node_id.remote())
        """
        return str(ray.get_runtime_context().get_node_id())

    # -- exec --------------------------------------------------------------------------
    async def exec(self, cmd: str, args: Sequence[str] = (), *, cwd: str | None = None,
                   user: str | int | None = None, env: Mapping[str, str] | None = None,
                   timeout: float | None = None, stdin: bytes | str | None = None
                   ) -> ExecOutput:
        """``AsyncSandbox.exec``: run ``cmd args`` and collect its output.

        Example::

            out = ray.get(actor.exec.remote("/bin/echo", ["hi"]))
        """
        sb = await self._sandbox()
        return await sb.exec(cmd, args, cwd=cwd, user=user, env=env, timeout=timeout,
                             stdin=stdin)

    async def shell(self, script: str, *, cwd: str | None = None,
                    user: str | int | None = None, env: Mapping[str, str] | None = None,
                    timeout: float | None = None, stdin: bytes | str | None = None
                    ) -> ExecOutput:
        """``AsyncSandbox.shell``: run ``script`` with the sandbox's shell.

        Example::

            out = ray.get(actor.shell.remote("echo $((6*7))"))
        """
        sb = await self._sandbox()
        return await sb.shell(script, cwd=cwd, user=user, env=env, timeout=timeout,
                              stdin=stdin)

    async def exec_stream(self, cmd: str, args: Sequence[str] = (), *,
                          cwd: str | None = None, user: str | int | None = None,
                          env: Mapping[str, str] | None = None, timeout: float | None = None,
                          stdin: bytes | None = None) -> AsyncIterator[ExecEvent]:
        """Run ``cmd`` and yield its events (``started``, ``stdout``, ``stderr``,
        ``exited``) as they happen: a Ray streaming generator (one object ref per event).

        Example::

            for ref in actor.exec_stream.remote("/bin/sh", ["-c", "echo a; echo b >&2"]):
                ev = ray.get(ref); print(ev.kind, ev.data)
        """
        sb = await self._sandbox()
        h = await sb.exec_stream(cmd, args, cwd=cwd, user=user, env=env, timeout=timeout,
                                 stdin=stdin is not None)
        if stdin is not None:
            await h.stdin.write(stdin)
            await h.stdin.close()
        async for ev in h.events():
            yield ev

    # -- files and figures -------------------------------------------------------------
    async def fs_read(self, path: str) -> bytes:
        """A guest file's bytes.

        Example::

            ray.get(actor.fs_read.remote("/etc/hostname"))
        """
        return await (await self._sandbox()).fs.read(path)

    async def fs_write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Write a guest file (created or replaced).

        Example::

            ray.get(actor.fs_write.remote("/tmp/in.txt", b"data"))
        """
        await (await self._sandbox()).fs.write(path, data, mode=mode)

    async def metrics(self) -> dict[str, Any]:
        """The guest's own figures (``AsyncSandbox.metrics``) plus ``node_id`` and ``name``.

        Example::

            print(ray.get(actor.metrics.remote())["memory"])
        """
        m = dict(await (await self._sandbox()).metrics())
        m["node_id"] = ray.get_runtime_context().get_node_id()
        m["name"] = self.name
        return m

    # -- map items -----------------------------------------------------------------------
    async def run_item(self, fn: str | Callable[..., Any], item: Any,
                       timeout: float | None) -> tuple[str, Any]:
        """Run one ``RaySandboxPool.map`` item: ``("ok", value)``, ``("error", message)``
        (the callable raised: final), ``("timeout", message)`` or ``("dead", message)``
        (the sandbox is gone: the pool retries elsewhere).

        A string is a shell script run as ``sh -c script microvm-item <item>`` (the item
        is ``$1``; value: the ``ExecOutput``); a callable gets ``(sandbox, item)``: an
        ``AsyncSandbox`` when it is a coroutine function, else a blocking ``Sandbox``
        (it then runs in a thread).

        Example::

            status, out = ray.get(actor.run_item.remote("echo $1", 7, 60.0))
        """
        try:
            sb = await self._sandbox()
            if isinstance(fn, str):
                out = await sb.exec(sb.config.shell, ["-c", fn, "microvm-item", str(item)],
                                    timeout=timeout)
                return "ok", out
            if inspect.iscoroutinefunction(fn):
                return "ok", await asyncio.wait_for(fn(sb, item), timeout)
            handle = await self._blocking_handle()
            return "ok", await asyncio.wait_for(asyncio.to_thread(fn, handle, item), timeout)
        except ExecTimeout as e:
            return "timeout", f"timed out after {timeout}s in {self.name}: {e}"
        except TimeoutError:
            return "timeout", f"timed out after {timeout}s in {self.name}"
        except SandboxNotRunning as e:
            return "dead", f"sandbox {self.name}: {e}"
        except AgentError as e:
            if e.kind in ("connection_lost", "closed"):
                return "dead", f"sandbox {self.name}: {e}"
            return "error", f"{type(e).__name__}: {e}"
        except FleetError as e:
            return "dead", str(e)
        except Exception as e:
            return "error", f"{type(e).__name__}: {e}"

    async def _blocking_handle(self) -> Any:
        if self._blocking is None:
            from microvm.sandbox import Sandbox

            self._blocking = await asyncio.to_thread(Sandbox.get, self.name)
        return self._blocking

    # -- lifecycle -----------------------------------------------------------------------
    async def _teardown(self) -> None:
        sb, self._sb = self._sb, None
        if self._blocking is not None:
            blocking, self._blocking = self._blocking, None
            with contextlib.suppress(Exception):
                await asyncio.to_thread(blocking.close)
        if sb is None:
            return
        from microvm.sandbox import AsyncSandbox

        with contextlib.suppress(Exception):
            await sb.stop(timeout=5)
        with contextlib.suppress(Exception):
            await AsyncSandbox.remove(self.name, timeout=5)

    async def stop(self) -> None:
        """Stop and remove the sandbox (idempotent); the actor then refuses new work.

        Example::

            ray.get(actor.stop.remote()); ray.kill(actor)
        """
        self._stopped = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self._teardown()


#: the Ray actor class: ``SandboxActor.remote(name, image=..., ...)`` (the arguments of
#: :class:`SandboxActorImpl`); ``.options(...)`` overrides placement
SandboxActor: Any = ray.remote(num_cpus=0, resources={"microvm": 1}, max_restarts=0,
                               max_task_retries=0)(SandboxActorImpl)
