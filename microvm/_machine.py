"""``Machine``: the low-level VM API (backend + kernel + disks, booted until the agent answers).

``start()`` launches the backend, connects to the guest agent over the
``agent`` port, says hello and sends the boot config; any failure on the way
kills the VMM and raises :class:`microvm.BootError` carrying the last lines of
the guest console.

Example::

    from microvm import Machine
    from microvm.backends import Disk
    with Machine(disks=[Disk(Path("root.img"))], cpus=1, memory=512) as m:
        r = m.agent.exec("/bin/echo", ["hi"])
        print(r.exit_code, r.stdout)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
import weakref
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from microvm.backends.base import (
    Backend,
    Disk,
    Share,
    SnapshotBackend,
    VmHandle,
    VmSpec,
    console_tail,
)
from microvm.errors import BootError, MicrovmError
from microvm.kernel import Kernel, ensure_kernel

if TYPE_CHECKING:
    from microvm.agent import AgentClient, SyncAgentClient

__all__ = ["ROOT_SHARE_TAG", "Machine", "map_root_plan"]

#: virtio-fs tag of a ``bind`` root (a host directory served as the guest's root)
ROOT_SHARE_TAG = "microvm-root"


def _resolve_backend(backend: Backend | str) -> Backend:
    if isinstance(backend, str):
        from microvm.backends import get_backend

        return get_backend(backend)
    return backend


def _device(index: int) -> str:
    return f"/dev/vd{chr(ord('a') + index)}"


def map_root_plan(plan: Mapping[str, Any], first_index: int) -> tuple[list[Disk], dict[str, Any]]:
    """Turn a rootfs mount plan naming disk *paths* into disks plus the agent's plan naming devices.

    ``first_index`` is the position of the first plan disk among the VM's disks
    (1 when a boot disk is ``/dev/vda``). Lower disks are attached read-only.
    Raises :class:`MicrovmError` for plans the agent cannot mount.

    Example::

        disks, agent_plan = map_root_plan(
            {"kind": "overlay", "lower": [{"disk": "img.erofs", "fstype": "erofs"}],
             "upper": {"disk": "upper.ext4", "fstype": "ext4", "upperdir": "/upper", "workdir": "/work"}},
            first_index=1)
        agent_plan["lower"][0]["device"]  # '/dev/vdb'
    """
    kind = plan.get("kind")
    disks: list[Disk] = []
    mapped: dict[str, Any]

    def attach(entry: Mapping[str, Any], readonly: bool, what: str) -> dict[str, Any]:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("disk"), str):
            raise MicrovmError(f"root plan {what} needs a 'disk' path, got {entry!r}")
        out = {k: v for k, v in entry.items() if k != "disk"}
        out["device"] = _device(first_index + len(disks))
        disks.append(Disk(Path(entry["disk"]), readonly=readonly))
        return out

    if kind == "overlay":
        lowers = plan.get("lower")
        if not isinstance(lowers, list) or not lowers:
            raise MicrovmError(f"overlay root plan needs a non-empty 'lower' list, got {lowers!r}")
        mapped = {
            "kind": "overlay",
            "lower": [attach(low, True, "lower") for low in lowers],
            "upper": attach(plan.get("upper"), False, "upper"),  # type: ignore[arg-type]
        }
    elif kind == "disk":
        root = plan.get("root")
        readonly = bool(isinstance(root, Mapping) and root.get("readonly", False))
        mapped = {"kind": "disk", **attach(root, readonly, "root")}  # type: ignore[arg-type]
    elif kind == "bind":
        # served by virtio-fs: the caller adds the share (see ROOT_SHARE_TAG)
        if not isinstance(plan.get("dir"), str):
            raise MicrovmError(f"bind root plan needs a 'dir' path, got {plan.get('dir')!r}")
        mapped = {"kind": "virtiofs", "tag": ROOT_SHARE_TAG,
                  "readonly": bool(plan.get("readonly", False))}
    else:
        raise MicrovmError(
            f"root plan kind {kind!r} is not supported by the guest agent: use 'overlay', "
            f"'disk' or 'bind'"
        )
    if first_index + len(disks) > 8:
        raise MicrovmError(f"root plan needs {len(disks)} disks: more than 8 in total")
    return disks, mapped


def _describe(cause: BaseException, step: str) -> str:
    """A boot failure's cause with the step it interrupted; a bare timeout names itself."""
    if isinstance(cause, TimeoutError | asyncio.TimeoutError):
        what = "timed out"
    elif isinstance(cause, asyncio.CancelledError):
        what = "cancelled"
    else:
        what = str(cause) or type(cause).__name__
    return f"{step}: {what}"


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class Machine:
    """One guest: ``start()``, then ``agent`` (a ``SyncAgentClient``), ``shutdown()``/``kill()``/``wait()``.

    ``disks[0]`` is the root (``/dev/vda``); it must contain the agent at
    ``/.microvm/agent`` (see :func:`microvm.build_ext4`). ``memory``
    is in MiB. ``net_socket`` is a unix stream socket carrying the guest's
    Ethernet frames; ``bootstrap`` is merged into the boot config sent to the
    agent (hostname, network, env, ca_certs, root...).

    Example (a root disk with busybox and the agent; ``with`` shuts the guest down)::

        >>> import shutil
        >>> from pathlib import Path
        >>> from microvm import Machine, build_ext4
        >>> from microvm.agent import agent_binary
        >>> (Path("root") / "bin").mkdir(parents=True)
        >>> _ = shutil.copy("/bin/busybox", "root/bin/busybox")
        >>> img = build_ext4(Path("root"), Path("root.img"), agent=agent_binary())
        >>> with Machine("qemu", disks=[img], cpus=1, memory=256) as m:
        ...     m.agent.exec("/bin/busybox", ["echo", "hi"]).stdout.split()
        [b'hi']
    """

    def __init__(
        self,
        backend: Backend | str = "qemu",
        kernel: Kernel | Path | None = None,
        disks: Sequence[Disk | Path] = (),
        cpus: int = 1,
        memory: int = 512,
        net_socket: Path | None = None,
        shares: Sequence[Share] = (),
        *,
        bootstrap: dict[str, Any] | None = None,
        boot_timeout: float = 60.0,
        rundir: Path | None = None,
        mac: str = "02:00:00:00:00:02",
        init: str = "/.microvm/agent",
        cmdline_extra: str = "",
        root: Mapping[str, Any] | None = None,
        snapshots: bool | None = None,
    ) -> None:
        if boot_timeout <= 0:
            raise MicrovmError(f"bad boot_timeout {boot_timeout!r}: must be > 0 seconds")
        self.backend = _resolve_backend(backend)
        self._kernel_arg = kernel
        self._disks = [d if isinstance(d, Disk) else Disk(Path(d)) for d in disks]
        self._own_rundir = rundir is None
        self.rundir = rundir or Path(tempfile.mkdtemp(prefix="microvm-"))
        if self._own_rundir:
            # dropped (or failed in __init__) without kill(): the rundir still goes
            weakref.finalize(self, shutil.rmtree, str(self.rundir), True)
        self.bootstrap_extra = dict(bootstrap or {})
        if root is not None:
            if not self._disks:
                # a private copy of the cached agent-only boot disk becomes /dev/vda
                from microvm._guestdisk import boot_disk

                vda = self.rundir / "boot.ext4"
                shutil.copyfile(boot_disk(), vda)
                self._disks = [Disk(vda)]
            extra, plan = map_root_plan(root, len(self._disks))
            self._disks += extra
            self.bootstrap_extra["root"] = plan
            if plan["kind"] == "virtiofs":
                shares = [*shares, Share(ROOT_SHARE_TAG, Path(root["dir"]).resolve(),
                                         readonly=plan["readonly"])]
        self.boot_timeout = boot_timeout
        self.boot_seconds: float | None = None
        #: The exit code the agent acknowledged on shutdown (None before a clean shutdown).
        self.exit_code: int | None = None
        kernel_elf, kernel_lib = self._kernel_paths(kernel)
        # Validate everything (cpus, memory, mac, tags) before anything starts.
        self.spec = VmSpec(
            kernel=kernel_elf,
            disks=self._disks,
            rundir=self.rundir,
            cpus=cpus,
            memory_mib=memory,
            init=init,
            cmdline_extra=cmdline_extra,
            net_socket=net_socket,
            mac=mac,
            shares=tuple(shares),
            kernel_library=kernel_lib,
        )
        self._handle: VmHandle | None = None
        self._agent: SyncAgentClient | None = None
        self._aagent: AgentClient | None = None
        #: guest RAM (snapshots; see microvm._snapshot) and, for a restore, what to load
        self._memfd: int | None = None
        self._restore: tuple[Path, bool, dict[str, Any]] | None = None
        self._step = "launching the VMM"   # what start/astart was doing (for BootError)
        if snapshots or (snapshots is None and isinstance(self.backend, SnapshotBackend)):
            from microvm._snapshot import memfd_for, snapshot_backend

            snapshot_backend(self.backend)
            fd, mem = memfd_for(memory)
            self._memfd = fd
            weakref.finalize(self, _close_fd, fd)
            self.spec = dataclasses.replace(self.spec, memory_file=mem, qmp=True)

    @staticmethod
    def _kernel_paths(kernel: Kernel | Path | None) -> tuple[Path, Path | None]:
        if isinstance(kernel, Kernel):
            return kernel.elf, kernel.library
        if kernel is not None:
            return Path(kernel), None
        k = ensure_kernel()
        return k.elf, k.library

    @property
    def handle(self) -> VmHandle:
        """The backend's handle on the running VMM (raises if not started).

        Example::

            m.handle.pid
        """
        if self._handle is None:
            raise MicrovmError("machine not started: call start() first")
        return self._handle

    @property
    def agent(self) -> SyncAgentClient:
        """The connected guest agent client (``exec``, ``exec_stream``, fs ops, ``shutdown``).

        Example::

            m.agent.exec("/bin/echo", ["hi"]).stdout
        """
        if self._agent is None:
            raise MicrovmError("machine not started: call start() first")
        return self._agent

    @property
    def agent_socket(self) -> Path:
        """The unix socket of the guest's ``agent`` port (for an asyncio ``AgentClient``).

        Example::

            client = await AgentClient.connect_unix(m.agent_socket)
        """
        return self.spec.agent_socket

    @property
    def console_log(self) -> Path:
        """The file receiving the guest console (hvc0).

        Example::

            print(m.console_log.read_text())
        """
        return self.spec.console_log

    def boot_config(self) -> dict[str, Any]:
        """The ``core.bootstrap`` payload: shares as virtio-fs mounts, then ``bootstrap`` overrides.

        Example::

            Machine(disks=[img], bootstrap={"hostname": "box"}).boot_config()["hostname"]
        """
        cfg: dict[str, Any] = {
            "hostname": "microvm",
            "root": None,
            "network": None,
            "ca_certs": [],
            "env": {},
            "mounts": [
                {"tag": s.tag, "path": s.mount_point, "readonly": s.readonly}
                for s in self.spec.shares if s.tag != ROOT_SHARE_TAG
            ],
        }
        cfg.update(self.bootstrap_extra)
        return cfg

    def start(self) -> Machine:
        """Boot and handshake; raise :class:`BootError` (with the console tail) on any failure.

        The blocking twin of :meth:`astart`: the same boot runs on the machine's own
        :class:`~microvm._portal.Portal`, which then carries :attr:`agent`.

        Example::

            m = Machine(disks=[img]).start()
        """
        if self._handle is not None:
            raise MicrovmError("machine already started")
        from microvm.agent import SyncAgentClient

        self._agent = SyncAgentClient._connect(self._boot(None), "machine")
        return self

    def _load_state(self) -> None:
        """Feed a restore its device state once the agent port is connected.

        QEMU re-announces the agent port's host connection after loading a snapshot when
        it differs from the snapshot's: with nobody connected yet the guest would get a
        stale hang-up that can arrive after the new session's first frames, and the
        agent's replies would then be dropped (core.reconfigure timed out under load).
        """
        assert self._restore is not None
        self.backend.load_state(self.handle, self._restore[0],  # type: ignore[attr-defined]
                                include_ram=self._restore[1])

    def _fail_boot(self, cause: BaseException) -> None:
        handle = self.handle
        # Give the VMM a moment to finish writing the console (e.g. a panic message).
        handle.wait(timeout=0.5)
        code = handle.poll()
        tail = console_tail(self.spec.console_log)
        vmm_log = self._vmm_log_tail()
        self.kill()
        if isinstance(cause, KeyboardInterrupt):
            raise cause
        state = f"VMM exited with status {code}" if code is not None else "VMM killed"
        if vmm_log:
            state += f"; VMM log: {vmm_log}"
        raise BootError(f"guest did not boot ({_describe(cause, self._step)}); {state}",
                        tail) from cause

    def _vmm_log_tail(self) -> str:
        parts = []
        for name in ("qemu.log", "launcher.log", "virtiofsd0.log"):
            text = console_tail(self.rundir / name, 5)
            if text.strip():
                parts.append(f"[{name}] " + " | ".join(text.splitlines()))
        return " ".join(parts)

    @property
    def aagent(self) -> AgentClient:
        """The asyncio ``AgentClient`` after :meth:`astart`.

        Example::

            r = await m.aagent.exec("/bin/echo", ["hi"])
        """
        if self._aagent is None:
            raise MicrovmError("machine not started with astart()")
        return self._aagent

    async def astart(
        self, more_bootstrap: Awaitable[Mapping[str, Any]] | None = None
    ) -> AgentClient:
        """asyncio variant of :meth:`start`: boot, hello, bootstrap; returns the ``AgentClient``.

        ``more_bootstrap`` is awaited once the agent said hello and merged into the boot
        config: what the caller prepares while the guest boots (a sandbox's network); for
        a restore (:meth:`from_snapshot`) its ``network`` goes into ``core.reconfigure``.
        Raises :class:`BootError` (with the console tail) on any failure, also when
        ``more_bootstrap`` raises (the cause is chained).

        Example::

            async with Machine(disks=[img]) as m:     # or: client = await m.astart()
                print((await m.aagent.exec("/bin/uname")).stdout)
            # network config built while the guest boots (a future set later):
            client = await Machine(disks=[img], net_socket=sock).astart(network_ready)
        """
        if self._handle is not None:
            raise MicrovmError("machine already started")
        client = await self._boot(more_bootstrap)
        self._aagent = client
        return client

    async def _launch(self) -> VmHandle:
        """``backend.launch`` in a worker thread; cancelled, it still kills what it started."""
        launch = asyncio.ensure_future(asyncio.to_thread(self.backend.launch, self.spec))
        try:
            return await asyncio.shield(launch)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                (await launch).kill()   # the launch ran on in its thread
            raise

    async def _boot(
        self, more_bootstrap: Awaitable[Mapping[str, Any]] | None
    ) -> AgentClient:
        """The one boot sequence of :meth:`start` and :meth:`astart`: launch, wait for the
        agent port (while the VMM lives), connect, hello, then bootstrap (or, for a
        restore, load the device state and reconfigure). Raises :class:`BootError`.
        """
        from microvm.agent import AgentClient

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            self._handle = await self._launch()
        except BaseException:
            if self._own_rundir:
                shutil.rmtree(self.rundir, ignore_errors=True)
            raise
        deadline = t0 + self.boot_timeout
        client: AgentClient | None = None
        try:
            self._step = "connecting to the agent port"
            while client is None:
                code = self._handle.poll()
                if code is not None:
                    raise BootError(f"VMM exited with status {code} before the agent port opened")
                if self.spec.agent_socket.exists():
                    client = await AgentClient.connect_unix(
                        self.spec.agent_socket, timeout=max(0.1, deadline - loop.time())
                    )
                    break
                if loop.time() > deadline:
                    raise BootError(f"agent socket did not appear within {self.boot_timeout}s")
                await asyncio.sleep(0.005)
            if self._restore is not None:
                # connected before the guest runs again: the restored port's "host
                # connected" matches the snapshot's, so the guest sees no stale hang-up
                # (QEMU's post-load notice) racing the new session (see _load_state)
                self._step = "loading the snapshot's device state"
                await asyncio.to_thread(self._load_state)
            self._step = "waiting for the agent's answer to core.hello"
            await client.hello(timeout=max(0.1, deadline - loop.time()))
            if self._restore is not None:
                payload = dict(self._restore[2])
                if more_bootstrap is not None:   # a restore's new network, built meanwhile
                    self._step = "waiting for the new identity (network)"
                    extra = await more_bootstrap
                    if extra.get("network") is not None:
                        payload["network"] = dict(extra["network"])
                # with a network, two steps, so that a hang names its part: entropy and
                # clock, then the identity (hostname, network: eth0 down, new MAC and
                # address, up), where a restore under load was seen to hang (README)
                first: dict[str, Any] = dict(payload)
                rest: dict[str, Any] = {}
                if payload.get("network") is not None:
                    first = {k: payload[k] for k in ("entropy", "clock") if k in payload}
                    rest = {k: v for k, v in payload.items() if k not in first}
                try:
                    self._step = ("waiting for the agent's answer to core.reconfigure "
                                  f"({', '.join(sorted(first))})")
                    await client.reconfigure(first)
                    if rest:
                        self._step = ("waiting for the agent's answer to core.reconfigure "
                                      f"({', '.join(sorted(rest))})")
                        await client.reconfigure(rest)
                except TimeoutError:
                    try:   # tell a lost reply from a stuck agent
                        await client.ping(timeout=3.0)
                        self._step += " (the agent answers core.ping: the reply was lost)"
                    except Exception:
                        self._step += " (the agent does not answer core.ping either)"
                    raise
            else:
                if more_bootstrap is not None:
                    self._step = "waiting for the boot config (network)"
                    self.bootstrap_extra.update(await more_bootstrap)
                self._step = "waiting for the agent's answer to core.bootstrap"
                await client.bootstrap(self.boot_config())
        except BaseException as e:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
            await asyncio.to_thread(self._fail_boot, e)
            raise  # unreachable: _fail_boot raises
        self.boot_seconds = loop.time() - t0
        return client

    async def ashutdown(self, exit_code: int = 0, timeout: float = 20.0) -> int | None:
        """asyncio variant of :meth:`shutdown`.

        Example::

            await m.ashutdown(exit_code=0)
        """
        if self._handle is None:
            return None
        code: int | None = None
        try:
            if self._aagent is not None and self._handle.poll() is None:
                with contextlib.suppress(Exception):
                    self.exit_code = await self._aagent.shutdown(exit_code=exit_code)
                code = await asyncio.to_thread(self._handle.wait, timeout)
        finally:
            if self._aagent is not None:
                with contextlib.suppress(Exception):
                    await self._aagent.close()
                self._aagent = None
            self.kill()
        return code

    async def __aenter__(self) -> Machine:
        if self._handle is None:
            await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.ashutdown()

    def console(self) -> str:
        """The guest console output so far (last 200 lines).

        Example::

            print(m.console())
        """
        return console_tail(self.spec.console_log, 200)

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the VMM to exit; its exit status, or None on timeout.

        Example::

            m.wait(timeout=5)
        """
        return self.handle.wait(timeout)

    def shutdown(self, exit_code: int = 0, timeout: float = 20.0) -> int | None:
        """Ask the agent to sync and power off; kill the VMM if it is not gone within ``timeout``.

        Returns the VMM exit status (None if it had to be killed); the exit code the
        agent acknowledged is kept in :attr:`exit_code`.

        Example::

            m.shutdown(exit_code=3); assert m.exit_code == 3
        """
        if self._handle is None:
            return None
        code: int | None = None
        try:
            if self._agent is not None and self._handle.poll() is None:
                with contextlib.suppress(Exception):
                    self.exit_code = self._agent.shutdown(exit_code=exit_code)
                code = self._handle.wait(timeout)
        finally:
            self.kill()
        return code

    def kill(self) -> None:
        """Kill the VMM and helpers, close the client, remove the rundir we created (idempotent).

        Example::

            m.kill()
        """
        if self._agent is not None:
            with contextlib.suppress(Exception):
                self._agent.close()
            self._agent = None
        if self._handle is not None:
            self._handle.kill()
        if self._own_rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)

    # -- snapshots (QEMU; see microvm._snapshot) -----------------------------------------
    def pause(self) -> None:
        """Stop the guest's vCPUs (QMP ``stop``); raises ``BackendUnavailable`` off QEMU.

        Example::

            m.pause(); m.resume()
        """
        from microvm._snapshot import snapshot_backend

        snapshot_backend(self.backend).pause(self.handle)

    def resume(self) -> None:
        """Let a paused guest run again (QMP ``cont``).

        Example::

            m.resume()
        """
        from microvm._snapshot import snapshot_backend

        snapshot_backend(self.backend).resume(self.handle)

    def snapshot(self, path: Path, *, extra: Mapping[str, Any] | None = None,
                 checksums: bool = True) -> dict[str, Any]:
        """Save this running guest (RAM, device state, writable disks, manifest) to the new
        directory ``path``; the guest pauses only for the copies. Returns the manifest.

        Raises :class:`~microvm.errors.SnapshotError` (``path`` exists, shares, not
        running) or ``BackendUnavailable`` (not QEMU) before pausing anything.

        Example::

            m.snapshot(Path("snap"), extra={"note": "warm"})
        """
        from microvm._snapshot import take

        return take(self, Path(path), extra=extra, checksums=checksums)

    @classmethod
    def from_snapshot(cls, path: Path, *, backend: Backend | str = "qemu",
                      kernel: Kernel | Path | None = None, rundir: Path | None = None,
                      disk_dir: Path | None = None, net_socket: Path | None = None,
                      hostname: str | None = None, network: Mapping[str, Any] | None = None,
                      boot_timeout: float = 60.0) -> Machine:
        """An unstarted machine that ``start()``/``astart()`` restores from snapshot ``path``
        (its own copies of the writable disks in ``disk_dir``, default the rundir), then
        tells the agent its new identity (entropy, clock, ``hostname``, ``network``).

        Raises :class:`~microvm.errors.SnapshotError` for a missing, corrupted or
        mismatched snapshot (kernel, accelerator, image disks) before anything starts.

        Example::

            m = Machine.from_snapshot(Path("snap"), hostname="fork-1").start()
        """
        from microvm._snapshot import (
            check_compatible,
            load_manifest,
            memfd_for,
            reconfig_payload,
            snapshot_backend,
            sparse_copy,
        )

        path = Path(path)
        be = snapshot_backend(_resolve_backend(backend))
        manifest = load_manifest(path)
        cfg = manifest["config"]
        kernel_elf, _ = cls._kernel_paths(kernel)
        check_compatible(path, manifest, be, kernel_elf)
        m = cls(be, kernel=kernel, disks=[Path("/")], cpus=cfg["cpus"], memory=cfg["memory_mib"],
                net_socket=net_socket, rundir=rundir, mac=cfg["mac"], init=cfg["init"],
                cmdline_extra=cfg["cmdline_extra"], boot_timeout=boot_timeout, snapshots=False)
        target = Path(disk_dir) if disk_dir is not None else m.rundir
        target.mkdir(parents=True, exist_ok=True)
        disks: list[Disk] = []
        for d in cfg["disks"]:
            if d["readonly"]:
                disks.append(Disk(Path(d["path"]), readonly=True))
            else:
                dst = target / f"disk{d['index']}.img"
                with contextlib.suppress(FileNotFoundError):
                    dst.unlink()
                sparse_copy(path / d["file"], dst)
                disks.append(Disk(dst))
        stream = manifest["memory"] == "stream"
        if stream:
            fd, mem = memfd_for(cfg["memory_mib"])
            m._memfd = fd
            weakref.finalize(m, _close_fd, fd)
        else:
            mem = path / "memory"
        m._disks = disks
        m.spec = dataclasses.replace(m.spec, disks=disks, memory_file=mem, memory_shared=stream,
                                     incoming=True, qmp=True)
        m._restore = (path / "state", stream, reconfig_payload(hostname, network))
        return m

    @classmethod
    def restore(cls, path: Path, *, backend: Backend | str = "qemu",
                kernel: Kernel | Path | None = None, rundir: Path | None = None,
                disk_dir: Path | None = None, net_socket: Path | None = None,
                hostname: str | None = None, network: Mapping[str, Any] | None = None,
                boot_timeout: float = 60.0) -> Machine:
        """:meth:`from_snapshot` then :meth:`start`: a running machine carrying on from
        the snapshot, independent of every other restore of it.

        Example::

            a = Machine.restore(Path("snap")); b = Machine.restore(Path("snap"))
        """
        return cls.from_snapshot(path, backend=backend, kernel=kernel, rundir=rundir,
                                 disk_dir=disk_dir, net_socket=net_socket, hostname=hostname,
                                 network=network, boot_timeout=boot_timeout).start()

    def __enter__(self) -> Machine:
        if self._handle is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()
