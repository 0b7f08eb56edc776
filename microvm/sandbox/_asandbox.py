"""``AsyncSandbox``: the whole stack in one call (the async core; ``Sandbox`` is its twin).

``create`` validates every argument (before any slow work), resolves the image (a
registry reference pulled through ``rootfs``, a ``rootfs.Image``, or a local directory
served as the root), prepares the root with the patches, and starts the sandbox's
supervisor process (VM, network gateway, TLS proxy for secrets, timers); it returns once
the guest agent answers. Exec and files go through the supervisor's agent relay;
lifecycle and network counters through its control socket. State lives in
``$MICROVM_HOME/sandboxes.db``.

Example::

    import asyncio
    from microvm import AsyncSandbox

    async def main() -> None:
        sb = await AsyncSandbox.create("demo", image="localhost:5000/busybox:1",
                                       registry_insecure=True, network="public_only")
        async with sb:
            out = await sb.shell("echo hello from $(hostname)")
            print(out.stdout_text)
    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import json
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from microvm.agent import AgentClient
from microvm.errors import (
    AgentError,
    BootError,
    SandboxConfigError,
    SandboxError,
    SandboxNotRunning,
)
from microvm.sandbox._config import (
    DnsOptions,
    PortMapping,
    SandboxConfig,
    TlsOptions,
    parse_secrets,
    validate_name,
)
from microvm.sandbox._control import ControlError, control_call
from microvm.sandbox._exec import AsyncExecHandle, ExecOutput
from microvm.sandbox._fs import AsyncSandboxFs
from microvm.sandbox._paths import SandboxPaths
from microvm.sandbox._state import SandboxRecord, StateDB

# netstack's gateway and tls_proxy (cryptography, h2, dnspython, pyroute2) are needed by
# the supervisor, not by a handle: here they are types only, so `microvm exec` stays light;
# the creator's side (launch: rootfs's store and registry client) loads on first use
if TYPE_CHECKING:
    from microvm.backends.base import Backend
    from microvm.sandbox import _launch
    from microvm.sandbox._netwiring import SecretProxy
    from microvm.sandbox._snapshots import SnapshotInfo
    from microvm.ssh._client import SshClient
    from netstack import Decision, Flow, NetworkPolicy
    from netstack.gateway import AddressPlan, Uplink
    from rootfs import Image, Patch, RegistryAuth, RootProvider
    from tls_proxy import ProxyConfig, Secret
else:
    class _LazyLaunch:
        def __getattr__(self, name: str) -> Any:
            from microvm.sandbox import _launch as launch

            return getattr(launch, name)

    _launch = _LazyLaunch()

log = logging.getLogger("microvm.sandbox")

__all__ = ["AsyncSandbox", "AsyncSandboxNetwork", "SandboxInfo"]

#: ``(sandbox_name, plan) -> Uplink``: builds the sandbox's uplink in the supervisor
UplinkFactory = Callable[[str, "AddressPlan"], "Uplink"]
#: ``(ProxyConfig) -> SecretProxy``: builds the secret-injecting proxy in the supervisor
ProxyFactory = Callable[["ProxyConfig"], "SecretProxy"]
Rlimits = Mapping[str, int | tuple[int | None, int | None] | None]
PortsArg = Mapping[int, int] | Sequence[str | tuple[int, int] | PortMapping]


class SandboxInfo:
    """A sandbox's row: ``name``, ``state``, ``labels``, ``pid``, times, ``error``.

    Example (:meth:`Sandbox.list` / :meth:`AsyncSandbox.list` return these)::

        >>> import shutil
        >>> from pathlib import Path
        >>> from microvm import Sandbox
        >>> from rootfs import ImageStore, build_image
        >>> (Path("bb") / "bin").mkdir(parents=True)
        >>> _ = shutil.copy("/bin/busybox", "bb/bin/busybox")
        >>> (Path("bb") / "bin/sh").symlink_to("busybox")
        >>> image = build_image(Path("bb"), "local/busybox:1", ImageStore(),
        ...                     config={"Cmd": ["/bin/sh"]})
        >>> with Sandbox.create("doc-info", image=image, network="none", memory=256,
        ...                     labels={"team": "a"}) as sb:
        ...     [(i.name, i.state, i.labels) for i in Sandbox.list(labels={"team": "a"})]
        [('doc-info', 'running', {'team': 'a'})]
    """

    def __init__(self, rec: SandboxRecord) -> None:
        self.name = rec.name
        self.state = rec.state
        self.labels = dict(rec.labels)
        self.pid = rec.pid
        self.created = rec.created
        self.started = rec.started
        self.stopped = rec.stopped
        self.error = rec.error
        self.config = SandboxConfig.from_json(rec.config_json)

    def __repr__(self) -> str:
        return f"SandboxInfo(name={self.name!r}, state={self.state!r}, labels={self.labels!r})"


class AsyncSandboxNetwork:
    """The sandbox's network: the effective ``policy``, ``explain``, live counters.

    Example::

        print(sb.network.explain(Flow("egress", "tcp", "10.0.0.1", 22)))
        print((await sb.network.stats())["guest_frames"])
    """

    def __init__(self, owner: AsyncSandbox) -> None:
        self._owner = owner
        #: the pcap file the gateway writes, when asked for with ``pcap=``
        self.pcap: Path | None = Path(owner.config.pcap) if owner.config.pcap else None

    @functools.cached_property
    def policy(self) -> NetworkPolicy:
        """The policy the gateway enforces (``none`` when the guest has no NIC); built on
        first use (it imports netstack: ``microvm exec`` never needs it).

        Example::

            print(sb.network.policy.default_egress)
        """
        return self._owner.config.policy()

    def evaluate(self, flow: Flow) -> Decision:
        """The policy's decision for ``flow`` (the same first-match rules the gateway runs).

        Example::

            sb.network.evaluate(Flow("egress", "tcp", "203.0.113.7", 443)).action
        """
        return self.policy.evaluate(flow)

    def explain(self, flow: Flow) -> str:
        """Why ``flow`` is allowed or denied, in one line (plus near-miss hints).

        Example::

            print(sb.network.explain(Flow("egress", "udp", "10.1.2.3", 53)))
        """
        return self.policy.explain(flow)

    async def stats(self) -> dict[str, Any]:
        """The gateway's counters (frames, bytes, RSTs sent, DNS queries, ...).

        Example::

            (await sb.network.stats())["rst_sent"]
        """
        result: dict[str, Any] = await self._owner._control({"op": "net_stats"})
        return result

    async def rule_counters(self) -> list[dict[str, Any]]:
        """Per-rule ``hits``/``packets``/``bytes`` (rules in order, then the defaults).

        Example::

            [c["hits"] for c in await sb.network.rule_counters()]
        """
        result: list[dict[str, Any]] = await self._owner._control({"op": "rule_counters"})
        return result


class AsyncSandbox:
    """One sandbox (see the module docstring). Get one from :meth:`create`, :meth:`get`
    or :meth:`start`; ``async with`` stops it on exit (and removes it unless detached).

    Example (a one-layer image built offline)::

        >>> import asyncio, shutil
        >>> from pathlib import Path
        >>> from microvm import AsyncSandbox
        >>> from rootfs import ImageStore, build_image
        >>> (Path("bb") / "bin").mkdir(parents=True)
        >>> _ = shutil.copy("/bin/busybox", "bb/bin/busybox")
        >>> (Path("bb") / "bin/sh").symlink_to("busybox")
        >>> image = build_image(Path("bb"), "local/busybox:1", ImageStore(),
        ...                     config={"Cmd": ["/bin/sh"]})
        >>> async def main() -> str:
        ...     async with await AsyncSandbox.create("doc-async", image=image,
        ...                                          network="none", memory=256) as sb:
        ...         return (await sb.shell("echo hi from $(hostname)")).stdout_text.strip()
        >>> asyncio.run(main())
        'hi from doc-async'
    """

    def __init__(self, name: str, *, db: StateDB | None = None) -> None:
        self.db = db or StateDB()
        rec = self.db.get(name)
        self.name = name
        self.paths = SandboxPaths(rec.sandbox_dir)
        self.config = SandboxConfig.from_json(rec.config_json)
        launch_file = self.paths.dir / "launch.json"
        self._launch: dict[str, Any] = (json.loads(launch_file.read_text())
                                        if launch_file.exists() else {})
        self._image: dict[str, Any] = self._launch.get("image", {})
        self._client: AgentClient | None = None
        self._client_lock = asyncio.Lock()
        self.fs = AsyncSandboxFs(self._agent)
        self.network = AsyncSandboxNetwork(self)

    # -- creation --------------------------------------------------------------------
    @classmethod
    async def create(
        cls,
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
        entrypoint: str | Sequence[str] | None = None,
        cmd: str | Sequence[str] | None = None,
        scripts: Mapping[str, str] | None = None,
        ports: PortsArg | None = None,
        volumes: Mapping[str, Any] | None = None,
        network: object = None,
        patches: Sequence[Patch] = (),
        secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
        pull_policy: str = "if-missing",
        registry_auth: RegistryAuth | tuple[str, str] | Mapping[str, str] | None = None,
        registry_insecure: bool = False,
        registry_ca_certs: str | Sequence[str] | None = None,
        upper_size_mib: int = 4096,
        max_duration: float | str | None = None,
        idle_timeout: float | str | None = None,
        rlimits: Rlimits | None = None,
        log_level: str = "info",
        detached: bool = False,
        replace: bool = False,
        replace_with_timeout: float = 10.0,
        backend: str | Backend = "qemu",
        dns: DnsOptions | None = None,
        tls: TlsOptions | None = None,
        pcap: str | os.PathLike[str] | None = None,
        root_provider: RootProvider | None = None,
        uplink: UplinkFactory | None = None,
        secret_proxy: ProxyFactory | None = None,
        boot_timeout: float = 120.0,
    ) -> AsyncSandbox:
        """Create and start a sandbox; returns once its guest agent answers.

        ``image``: a registry reference, a ``rootfs.Image``, or a local directory (served
        as the root through virtio-fs; patches then change it in place). ``network``:
        anything ``NetworkPolicy.coerce`` accepts (default ``public_only``; ``"none"``:
        no NIC). ``secrets``: ``tls_proxy.Secret`` or ``{"env", "value", "host"|"hosts"}``;
        the guest sees only placeholders and TLS to their hosts is intercepted (a sandbox
        that cannot intercept refuses to start; a secret for a host the policy denies is
        refused). ``ports``: ``{host: guest}`` or ``"8080:80[/udp]"`` on 127.0.0.1.
        ``volumes``: ``{"/guest": "/host/dir" | {"host": d, "readonly": True} |
        {"named": "cache"}}``. ``backend``, ``root_provider``, ``uplink`` (a factory
        ``(name, AddressPlan) -> Uplink``) and ``secret_proxy`` (a factory
        ``(ProxyConfig) -> SecretProxy``) swap one layer; objects that go to the
        supervisor process must be picklable.

        Raises :class:`SandboxConfigError` (bad argument), ``netstack.PolicyError`` (bad
        policy), :class:`SandboxExists`, :class:`NoUplinkError`, ``rootfs`` errors (unknown
        image, pull failure), :class:`BackendUnavailable`, :class:`BootError`.

        Example::

            sb = await AsyncSandbox.create("web", image="busybox:1.36", ports={8080: 80},
                                           secrets=[{"env": "TOKEN", "value": "s3cret",
                                                     "host": "api.example.com"}])
        """
        from rootfs import Image, Patch

        validate_name(name)
        secret_list = parse_secrets(secrets)
        image_obj = image if isinstance(image, Image) else None
        kind: Literal["ref", "dir", "object"] | None
        if image_obj is not None:
            image_ref, kind = image_obj.ref, "object"
        elif isinstance(image, os.PathLike):
            image_ref, kind = os.fspath(image), "dir"
        elif isinstance(image, str):
            image_ref, kind = image, None  # decided by SandboxConfig.build
        else:
            raise SandboxConfigError(f"image must be a reference, a directory or a rootfs.Image, "
                                     f"got {type(image).__name__}")
        backend_name = backend if isinstance(backend, str) else "qemu"
        cfg = SandboxConfig.build(
            name, image=image_ref, image_kind=kind, cpus=cpus, memory=memory, env=env,
            workdir=workdir, shell=shell, user=user, hostname=hostname, labels=labels,
            entrypoint=entrypoint, cmd=cmd, scripts=scripts, ports=ports, volumes=volumes,
            network=network, secrets=secret_list, pull_policy=pull_policy,
            registry_insecure=registry_insecure, registry_ca_certs=registry_ca_certs,
            upper_size_mib=upper_size_mib, max_duration=max_duration,
            idle_timeout=idle_timeout, rlimits=rlimits, log_level=log_level,
            detached=detached, backend=backend_name, dns=dns, tls=tls, pcap=pcap)
        patch_list = list(patches)
        if not all(isinstance(p, Patch) for p in patch_list):
            raise SandboxConfigError("patches must be rootfs.Patch objects (Patch.text(...), ...)")
        auth = _registry_auth(registry_auth)
        if isinstance(replace_with_timeout, bool) or not isinstance(
                replace_with_timeout, int | float) or replace_with_timeout < 0:
            raise SandboxConfigError(f"bad replace_with_timeout {replace_with_timeout!r}: "
                                     f"seconds >= 0")
        if not isinstance(boot_timeout, int | float) or boot_timeout <= 0:
            raise SandboxConfigError(f"bad boot_timeout {boot_timeout!r}: seconds > 0")
        be = backend if not isinstance(backend, str) else None
        if be is None:
            from microvm.backends import get_backend

            be_check: Backend = get_backend(backend_name)
        else:
            be_check = be
        await asyncio.to_thread(be_check.check)
        if cfg.network is not None and uplink is None:
            from microvm.sandbox._netwiring import can_build_uplink

            if not can_build_uplink():
                from microvm.errors import NoUplinkError

                raise NoUplinkError(
                    f"sandbox {name!r}: the network policy allows traffic but no uplink can "
                    f"be built here (the TAP uplink needs root or CAP_NET_ADMIN and "
                    f"/dev/net/tun, the rootless one Debian's passt); run as root, install "
                    f"passt, or pass network='none'")
        db = StateDB()
        if replace:
            with contextlib.suppress(SandboxError):
                await cls._remove(name, timeout=float(replace_with_timeout), db=db)
        paths = SandboxPaths.of(name)
        db.insert(name, config_json=cfg.to_json(), labels=cfg.labels, sandbox_dir=paths.dir)
        ok = False
        try:
            if paths.dir.exists():   # leftovers of a record removed by hand
                _launch.remove_files(paths, None)
            paths.dir.mkdir(parents=True, mode=0o700)
            prepared = await asyncio.to_thread(
                _launch.prepare_launch, cfg, paths, image_obj=image_obj, patches=patch_list,
                secrets=secret_list, root_provider=root_provider, registry_auth=auth,
                db_path=db.path, boot_timeout=float(boot_timeout))
            _launch.write_launch(paths, prepared.launch,
                                 {"backend": be, "uplink": uplink, "secret_proxy": secret_proxy})
            for attempt in (1, 2):
                try:
                    await asyncio.to_thread(_launch.spawn_supervisor, paths, name, secret_list,
                                            detached=detached, timeout=float(boot_timeout) + 30)
                    break
                except BootError as e:
                    if attempt == 2 or not _launch.boot_panicked(e):
                        raise
                    log.warning("sandbox %s: the guest kernel panicked while booting (%s); "
                                "booting once more", name, str(e).splitlines()[0])
                    db.set_state(name, "created")
            ok = True
        finally:
            if not ok:
                launch = None
                with contextlib.suppress(OSError, ValueError):
                    launch = json.loads((paths.dir / "launch.json").read_text())
                _launch.remove_files(paths, launch)
                db.delete(name)
        return cls(name, db=db)

    @classmethod
    async def start(cls, name: str, *, secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
                    detached: bool | None = None, boot_timeout: float = 120.0) -> AsyncSandbox:
        """Start a stopped (or crashed) sandbox again with its stored config and disk.

        Secret values are never stored: a sandbox created with secrets needs them again
        (``secrets=``), else :class:`SandboxConfigError`.

        Example::

            sb = await AsyncSandbox.start("web")
        """
        db = StateDB()
        rec = db.get(name)
        if rec.state in ("running", "created") and rec.supervisor_alive:
            raise SandboxError(f"sandbox {name!r} is already {rec.state}")
        cfg = SandboxConfig.from_json(rec.config_json)
        secret_list = parse_secrets(secrets)
        want = {s.env for s in cfg.secrets}
        if want != {s.env for s in secret_list}:
            raise SandboxConfigError(
                f"sandbox {name!r} was created with secrets {sorted(want)}: their values are "
                f"never stored, pass them again with secrets=")
        if detached is not None and detached != cfg.detached:
            import dataclasses

            cfg = dataclasses.replace(cfg, detached=detached)
            paths = SandboxPaths(rec.sandbox_dir)
            launch = json.loads((paths.dir / "launch.json").read_text())
            launch["config"] = cfg.to_json()
            _launch.write_launch(paths, launch, {})
        paths = SandboxPaths(rec.sandbox_dir)
        db.set_state(name, "created")
        try:
            await asyncio.to_thread(_launch.spawn_supervisor, paths, name, secret_list,
                                    detached=cfg.detached, timeout=float(boot_timeout) + 30)
        except BaseException:
            db.set_state(name, "crashed", error="start failed")
            raise
        return cls(name, db=db)

    @classmethod
    async def get(cls, name: str) -> AsyncSandbox:
        """A handle on an existing sandbox (any state; exec needs it ``running``).

        Example::

            sb = await AsyncSandbox.get("web")
        """
        return cls(name)

    @classmethod
    async def list(cls, labels: Mapping[str, str] | None = None) -> builtins.list[SandboxInfo]:
        """Every sandbox (or those carrying all ``labels``), oldest first.

        Example::

            [i.name for i in await AsyncSandbox.list(labels={"team": "a"})]
        """
        return [SandboxInfo(r) for r in StateDB().list(labels=labels)]

    @classmethod
    async def remove(cls, name: str, *, timeout: float = 10.0) -> None:
        """Stop ``name`` if it runs (gracefully, then killed after ``timeout``) and delete
        everything it owns: processes, network objects, sockets, its disk, its record.
        Named volumes stay.

        Example::

            await AsyncSandbox.remove("web")
        """
        await cls._remove(name, timeout=timeout, db=StateDB())

    @classmethod
    async def _remove(cls, name: str, *, timeout: float, db: StateDB) -> None:
        rec = db.get(name)
        sb = cls(name, db=db)
        if rec.supervisor_alive:
            await sb.stop(timeout=timeout)
        _launch.release_attached(name)
        _launch.remove_files(sb.paths, sb._launch)
        db.delete(name)

    # -- plumbing ------------------------------------------------------------------------
    def info(self) -> SandboxInfo:
        """The current record (state refreshed: a dead supervisor reads ``crashed``).

        Example::

            print(sb.info().state)
        """
        return SandboxInfo(self.db.get(self.name))

    @property
    def state(self) -> str:
        """``created``, ``running``, ``stopped`` or ``crashed``.

        Example::

            assert sb.state == "running"
        """
        return self.db.get(self.name).state

    def _not_running(self) -> SandboxNotRunning:
        from microvm.backends.base import console_tail  # (the backends load QEMU's module)

        rec = self.db.get(self.name)
        tail = console_tail(self.paths.console_log, 20) if rec.state == "crashed" else ""
        why = f": {rec.error.splitlines()[0]}" if rec.error else ""
        return SandboxNotRunning(f"sandbox {self.name!r} is {rec.state}{why}", rec.state, tail)

    async def _agent(self) -> AgentClient:
        async with self._client_lock:
            if self._client is not None and not self._client.closed:
                return self._client
            rec = self.db.get(self.name)
            if rec.state != "running":
                raise self._not_running()
            try:
                client = await AgentClient.connect_unix(self.paths.agent_sock, timeout=5.0)
                await client.hello(timeout=10.0)
            except AgentError:
                raise self._not_running() from None
            self._client = client
            return client

    async def _control(self, request: dict[str, Any], timeout: float = 30.0) -> Any:
        rec = self.db.get(self.name)
        if rec.state != "running":
            raise self._not_running()
        try:
            return await control_call(self.paths.control_sock, request, timeout)
        except ControlError:
            if self.db.get(self.name).state != "running":
                raise self._not_running() from None
            raise

    def _defaults(self, cwd: str | None, user: str | int | None
                  ) -> tuple[str | None, str | int | None]:
        cwd = cwd or self.config.workdir or self._image.get("workdir") or None
        user = user if user is not None else (self.config.user or self._image.get("user") or None)
        return cwd, user

    # -- exec --------------------------------------------------------------------------
    async def exec(self, cmd: str, args: Sequence[str] = (), *, cwd: str | None = None,
                   user: str | int | None = None, env: Mapping[str, str] | None = None,
                   timeout: float | None = None, stdin: bytes | str | None = None,
                   tty: bool = False, rlimits: Rlimits | None = None) -> ExecOutput:
        """Run ``cmd args`` to completion and collect its output.

        Defaults: the sandbox's (or the image's) workdir and user; the environment is the
        image's, the sandbox's ``env`` and the secrets' placeholders, plus ``env``.
        Raises ``ExecTimeout`` (with the partial result) when ``timeout`` expires,
        :class:`AgentError` when it cannot start (``kind`` not_found, bad_cwd, ...).

        Example::

            out = await sb.exec("/bin/sh", ["-c", "echo $HOME"], env={"HOME": "/root"})
        """
        cwd, user = self._defaults(cwd, user)
        data = stdin.encode() if isinstance(stdin, str) else stdin
        try:
            r = await (await self._agent()).exec(
                cmd, list(args), env=env, cwd=cwd, user=user, stdin=data, tty=tty,
                rlimits=self._rlimits(rlimits), timeout=timeout)
        except ValueError as e:
            raise SandboxConfigError(str(e)) from None
        return ExecOutput.of(r)

    def _rlimits(self, rlimits: Rlimits | None) -> dict[str, Any] | None:
        merged: dict[str, Any] = dict(self.config.rlimits)
        merged.update(rlimits or {})
        return merged or None

    async def exec_stream(self, cmd: str, args: Sequence[str] = (), *, cwd: str | None = None,
                          user: str | int | None = None, env: Mapping[str, str] | None = None,
                          timeout: float | None = None, stdin: bool = True, tty: bool = False,
                          rows: int = 24, cols: int = 80,
                          rlimits: Rlimits | None = None) -> AsyncExecHandle:
        """Start ``cmd`` and return a handle on it (events, stdin, signal, kill, resize, wait).

        Example::

            h = await sb.exec_stream("/bin/cat")
            await h.stdin.write(b"hi"); await h.stdin.close()
            print((await h.wait()).stdout)
        """
        cwd, user = self._defaults(cwd, user)
        try:
            proc = (await self._agent()).exec_stream(
                cmd, list(args), env=env, cwd=cwd, user=user, tty=tty, rows=rows, cols=cols,
                rlimits=self._rlimits(rlimits), timeout=timeout, stdin=stdin)
        except ValueError as e:
            raise SandboxConfigError(str(e)) from None
        await proc.start()
        return AsyncExecHandle(proc)

    async def shell(self, script: str, *, cwd: str | None = None, user: str | int | None = None,
                    env: Mapping[str, str] | None = None, timeout: float | None = None,
                    stdin: bytes | str | None = None) -> ExecOutput:
        """Run ``script`` with the sandbox's shell (``shell=``, default ``/bin/sh -c``).

        Example::

            print((await sb.shell("ls / | wc -l")).stdout_text)
        """
        return await self.exec(self.config.shell, ["-c", script], cwd=cwd, user=user, env=env,
                               timeout=timeout, stdin=stdin)

    def default_command(self) -> builtins.list[str]:
        """``entrypoint + cmd``: the sandbox's overrides, else the image's OCI config.

        Example::

            print(sb.default_command())     # e.g. ['/bin/sh', '-c', 'serve']
        """
        ep = list(self.config.entrypoint) if self.config.entrypoint is not None \
            else list(self._image.get("entrypoint", []))
        cmd = list(self.config.cmd) if self.config.cmd is not None \
            else list(self._image.get("cmd", []))
        return ep + cmd

    async def exec_default(self, *, timeout: float | None = None,
                           stdin: bytes | str | None = None) -> ExecOutput:
        """Run the image's entrypoint + cmd (or the sandbox's overrides) with its env and workdir.

        Example::

            out = await sb.exec_default()
        """
        argv = self.default_command()
        if not argv:
            raise SandboxConfigError(f"sandbox {self.name!r}: the image has no entrypoint or "
                                     f"cmd, and none was given (entrypoint=/cmd=)")
        return await self.exec(argv[0], argv[1:], timeout=timeout, stdin=stdin)

    # -- observation ---------------------------------------------------------------------
    async def metrics(self) -> dict[str, Any]:
        """The guest's own figures (uptime_ms, load, cpu, memory, disk, net).

        Example::

            m = await sb.metrics(); print(m["memory"])
        """
        return await (await self._agent()).metrics()

    def logs(self, *, tail: int | None = None, source: str = "console") -> str:
        """The guest console (``source="console"``) or the supervisor's log (``"supervisor"``).

        Example::

            print(sb.logs(tail=20))
        """
        if source not in ("console", "supervisor"):
            raise SandboxConfigError(f"bad log source {source!r}: use 'console' or 'supervisor'")
        path = self.paths.console_log if source == "console" else self.paths.supervisor_log
        if not path.exists():
            return ""
        if tail is not None:
            from microvm.backends.base import console_tail

            return console_tail(path, tail)
        return path.read_text(errors="replace")

    async def published_ports(self) -> dict[str, int]:
        """The host ports actually bound: ``{"tcp:80": 8080, "udp:53": 40123}``.

        Example::

            port = (await sb.published_ports())["tcp:80"]
        """
        status: dict[str, Any] = await self._control({"op": "status"})
        return dict(status.get("published", {}))

    # -- lifecycle -----------------------------------------------------------------------
    async def stop(self, timeout: float = 10.0) -> None:
        """Shut the guest down (sync, power off); killed if not gone within ``timeout``.

        Example::

            await sb.stop()
        """
        await self._close_client()
        rec = self.db.get(self.name)
        if not rec.supervisor_alive:
            _launch.release_attached(self.name)
            return
        with contextlib.suppress(ControlError):
            await control_call(self.paths.control_sock, {"op": "stop", "timeout": timeout}, 5.0)
        if not await _launch.wait_dead(rec.pid, rec.pid_start, timeout + 15):
            await self._force_kill(rec)
        _launch.release_attached(self.name)

    async def kill(self) -> None:
        """Stop at once (the VM is killed; the network torn down).

        Example::

            await sb.kill()
        """
        await self._close_client()
        rec = self.db.get(self.name)
        if rec.supervisor_alive:
            with contextlib.suppress(ControlError):
                await control_call(self.paths.control_sock, {"op": "kill"}, 5.0)
            if not await _launch.wait_dead(rec.pid, rec.pid_start, 15):
                await self._force_kill(rec)
        _launch.release_attached(self.name)

    async def _force_kill(self, rec: SandboxRecord) -> None:
        """The supervisor does not answer: SIGKILL it; its VMM dies with it (pdeathsig) and
        ``netstack.gateway.cleanup_stale`` removes the network objects it left."""
        if rec.pid and rec.supervisor_alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGKILL)
            await _launch.wait_dead(rec.pid, rec.pid_start, 10)
        from netstack.gateway import cleanup_stale

        await asyncio.to_thread(cleanup_stale)
        self.db.set_state(self.name, "stopped", error="killed (the supervisor did not answer)",
                          only_if=("running", "created", "crashed"))

    async def wait(self, timeout: float | None = None) -> str:
        """Wait until the sandbox is no longer running; returns its final state.

        Example::

            print(await sb.wait(timeout=60))     # 'stopped' or 'crashed'
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            rec = self.db.get(self.name)
            if rec.state in ("stopped", "crashed"):
                _launch.release_attached(self.name)
                return rec.state
            if deadline is not None and loop.time() > deadline:
                return rec.state
            await asyncio.sleep(0.1)

    async def _close_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await client.close()

    async def close(self) -> None:
        """Drop this handle's connection (the sandbox keeps running).

        Example::

            await sb.close()
        """
        await self._close_client()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
        if not self.config.detached:
            with contextlib.suppress(SandboxError):
                await AsyncSandbox._remove(self.name, timeout=10.0, db=self.db)

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.name!r})"

    async def ssh(self, *, idle_timeout: float | None = None) -> SshClient:
        """A connected paramiko client into the guest over a socket pair (no TCP port, no
        sshd in the guest): ``exec(cmd) -> (status, stdout, stderr)``, ``shell()``,
        ``sftp()``; see :mod:`microvm.ssh`. The client itself is blocking.

        Example::

            with await sb.ssh() as ssh:
                print(ssh.exec("uname -r"))
        """
        from microvm.ssh._client import connect

        return await asyncio.to_thread(connect, self, idle_timeout=idle_timeout)

    # -- snapshots, fork, pause (QEMU; microvm.sandbox._snapshots) -------------------------
    async def snapshot(self, name: str, *, checksums: bool = True,
                       disk_only: bool = False) -> SnapshotInfo:
        """Save this running sandbox (RAM, device state, its disk; the image pinned by
        digest) as ``$MICROVM_HOME/snapshots/<name>``; it pauses only for the copies.
        ``disk_only=True``: the light kind, the upper disk and the pinned image without
        memory (a restore boots cold from it; ``SnapshotInfo.kind`` is ``"disk"``).

        Raises :class:`~microvm.errors.SnapshotError` (name taken, volumes or a directory
        root: virtio-fs cannot be snapshotted), ``BackendUnavailable`` (not QEMU).

        Example::

            info = await sb.snapshot("warm"); print(info.path)
            await sb.snapshot("after-setup", disk_only=True)
        """
        from microvm.sandbox import _snapshots as _snap

        target = _snap.snapshot_target(name)
        if disk_only:
            path = await _snap.take_disk(self, target)
        else:
            path = await _snap.take(self, target, checksums=checksums)
        return await asyncio.to_thread(_snap.SnapshotInfo.of, path)

    @classmethod
    async def restore(cls, snapshot: str | os.PathLike[str], *, name: str,
                      secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
                      detached: bool = False, labels: Mapping[str, str] | None = None,
                      boot_timeout: float = 120.0) -> AsyncSandbox:
        """A new, independent sandbox ``name`` carrying on from ``snapshot`` (a name or a
        directory): its own supervisor, network slot, MAC/IP, disk copy, fresh entropy,
        the host's clock. Secret values are never stored: pass them again.

        Raises :class:`~microvm.errors.SnapshotError` (missing, corrupted, other kernel or
        image), :class:`SandboxConfigError`, :class:`SandboxExists` before starting.

        Example::

            a = await AsyncSandbox.restore("warm", name="a")
        """
        from microvm.sandbox import _snapshots as _snap

        return await _snap.restore(cls, snapshot, name=name, secrets=secrets,
                                   detached=detached, labels=labels, boot_timeout=boot_timeout)

    async def fork(self, *, name: str | None = None,
                   secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
                   detached: bool = False) -> AsyncSandbox:
        """A copy of this running sandbox as it is now (default name ``<name>-fork-<k>``);
        this one pauses for tens of milliseconds and carries on.

        Example::

            child = await sb.fork()
        """
        forks = await self.fork_many(1, names=None if name is None else [name],
                                     secrets=secrets, detached=detached)
        return forks[0]

    async def fork_many(self, n: int, *, names: Sequence[str] | None = None,
                        secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
                        detached: bool = False) -> builtins.list[AsyncSandbox]:
        """``n`` forks of this running sandbox from one frozen template (1..64).

        Example::

            forks = await sb.fork_many(5)
        """
        from microvm.sandbox import _snapshots as _snap

        return await _snap.fork_many(self, n, names=names, secrets=secrets, detached=detached)

    async def pause(self) -> None:
        """Freeze the guest (its processes stop; network, timers and record stay).

        Example::

            await sb.pause(); await sb.resume()
        """
        from microvm.sandbox import _snapshots as _snap

        await _snap.pause(self)

    async def resume(self) -> None:
        """Run a paused guest again, its clock stepped to the host's.

        Example::

            await sb.resume()
        """
        from microvm.sandbox import _snapshots as _snap

        await _snap.resume(self)


def _registry_auth(value: object) -> RegistryAuth | tuple[str, str] | None:
    from rootfs import RegistryAuth

    if value is None or isinstance(value, RegistryAuth):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return (value[0], value[1])
    if isinstance(value, Mapping):
        user, pw = value.get("username"), value.get("password")
        if isinstance(user, str) and isinstance(pw, str):
            return (user, pw)
        raise SandboxConfigError(f"registry_auth needs 'username' and 'password' (got keys: "
                                 f"{sorted(value)})")
    raise SandboxConfigError("registry_auth must be rootfs.RegistryAuth, (user, password) or "
                             "{'username': ..., 'password': ...}")
