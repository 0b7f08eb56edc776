"""The per-sandbox supervisor process: ``python -m microvm.sandbox._supervisor SANDBOX_DIR``.

One supervisor per sandbox owns the VMM (a :class:`~microvm.Machine`), the network
(:class:`~microvm.sandbox._netwiring.SandboxNet`: uplink, gateway, TLS proxy), and the
timers (``max_duration``, ``idle_timeout``). Library callers and the CLI talk to it over
two unix sockets in its runtime directory:

* ``agent.sock``: the guest agent protocol, relayed (:class:`~microvm.sandbox._relay.AgentRelay`),
  so any number of ordinary ``AgentClient`` s exec and move files concurrently;
* ``control.sock``: one JSON object per line, answered by one JSON line
  (:mod:`microvm.sandbox._control`): ``status``, ``stop``, ``kill``, ``net_stats``,
  ``rule_counters``, ``touch``, and (QEMU) ``pause``, ``resume``, ``snapshot``
  (:mod:`microvm.sandbox._snapshots`).

Start-up contract with the creator (:mod:`microvm.sandbox._launch`): ``launch.json`` in the
sandbox directory holds the config and the root plan; the first line on stdin holds the
secrets (values never touch the disk); in attached mode stdin then stays open and its EOF
(the creator died) stops the sandbox. When everything is up, one JSON line on stdout says
``{"ok": true}`` (or ``{"ok": false, "error": CLASS, "message": ...}``) and stdout is closed.
State transitions go to ``$MICROVM_HOME/sandboxes.db``; a guest that dies unasked is
``crashed`` with the console tail.

Example::

    python -m microvm.sandbox._supervisor ~/.microvm/sandboxes/web   # started by Sandbox.create
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microvm._machine import Machine
from microvm.backends.base import Share, console_tail
from microvm.errors import MicrovmError
from microvm.sandbox import _control as control
from microvm.sandbox._config import SandboxConfig
from microvm.sandbox._paths import SandboxPaths
from microvm.sandbox._state import StateDB

if TYPE_CHECKING:  # the network stack is imported while the guest boots (see ``up``)
    from microvm.sandbox._netwiring import SandboxNet
    from tls_proxy import Secret

log = logging.getLogger("microvm.sandbox._supervisor")

__all__ = ["Supervisor", "main"]

#: ``log_level`` of the sandbox -> the supervisor's logging level (``trace`` = debug)
_LOG_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
               "debug": logging.DEBUG, "trace": logging.DEBUG}


class Supervisor:
    """Brings one sandbox up, serves it, and tears it down (see the module docstring)."""

    def __init__(self, paths: SandboxPaths, launch: dict[str, Any],
                 secrets: list[dict[str, Any]]) -> None:
        self.paths = paths
        self.cfg = SandboxConfig.from_json(launch["config"])
        self.root_plan: dict[str, Any] | None = launch.get("root_plan")
        self.launch = launch
        self.boot_env: dict[str, str] = launch.get("boot_env", {})
        self.plugins: dict[str, Any] = {}
        if (paths.dir / "plugins.pickle").exists():
            self.plugins = pickle.loads((paths.dir / "plugins.pickle").read_bytes())
        self._secret_items = secrets
        self._secrets: list[Secret] | None = None
        self.db = StateDB(Path(launch["db"]))
        self.machine: Machine | None = None
        self.net: SandboxNet | None = None
        self.relay: Any = None
        self.control: asyncio.AbstractServer | None = None
        self.stop_requested: asyncio.Event | None = None
        self.stop_mode = "stop"          # "stop" (graceful) or "kill"
        self.stop_timeout = 10.0
        self.stop_reason = ""
        self.started = time.monotonic()
        self.last_touch = time.monotonic()
        self.paused = False
        #: wall-clock time (epoch seconds) of each bring-up step (the report's ``phases``:
        #: where a start's time goes; benchmarks.snapshot reports a restore's)
        self.phases: dict[str, float] = {}
        #: memfds of fork templates this sandbox was frozen into (``fork_template``), kept
        #: open until the forks mapped them (``fork_release``) or the sandbox stops
        self._template_fds: list[int] = []
        #: set while fork_template replaces the VMM (serve() follows the new one)
        self._swapping = False   # fork_template is replacing the VMM (see _vm_exit)
        #: the sandbox's writable disk paths before its first fork_template (symlinks to
        #: the current VMM's copies after it)
        self._disk_aliases: list[Path] = []

    def _phase(self, name: str) -> None:
        self.phases[name] = time.time()

    # -- bring-up ------------------------------------------------------------------
    def _shares(self) -> list[Share]:
        shares = []
        for i, v in enumerate(self.cfg.volumes):
            if v.host is not None:
                src = Path(v.host)
            else:
                assert v.named is not None
                src = self.paths.volume(v.named)
                src.mkdir(parents=True, exist_ok=True)
            shares.append(Share(f"vol{i}", src, readonly=v.readonly, guest_path=v.guest_path))
        return shares

    @property
    def secrets(self) -> list[Secret]:
        """The secrets as ``tls_proxy.Secret`` (built, and tls_proxy imported, on first use)."""
        if self._secrets is None:
            from tls_proxy import Secret

            self._secrets = [Secret(d["env"], d["value"], d["hosts"],
                                    placeholder=d["placeholder"], inject=tuple(d["inject"]))
                             for d in self._secret_items]
        return self._secrets

    async def up(self) -> None:
        """Boot the machine with its network (see :meth:`_start_with_network`), then serve
        the agent relay and the control socket."""
        cfg = self.cfg
        self.stop_requested = asyncio.Event()
        bootstrap: dict[str, Any] = {"hostname": cfg.hostname or cfg.name, "env": self.boot_env}
        if cfg.network is not None:
            client = await self._start_with_network(bootstrap)
        else:
            client = await self._start(bootstrap)
        self._phase("agent_ready")
        from microvm.sandbox._relay import AgentRelay

        assert client.ready is not None
        self.relay = AgentRelay(client, client.ready, on_activity=self._touch)
        await self.relay.serve_unix(self.paths.agent_sock)
        await self._install_scripts(client)
        self.control = await asyncio.start_unix_server(self._control_client,
                                                       path=str(self.paths.control_sock))
        os.chmod(self.paths.control_sock, 0o600)
        self._phase("serving")

    async def _new_machine(self, bootstrap: dict[str, Any], net_socket: Path | None = None
                           ) -> Machine:
        """The unstarted machine: a boot, or a snapshot restore or fork (its snapshot
        checked and its disks copied: ``checks_start`` to ``vmm_start`` in the phases)."""
        cfg = self.cfg
        backend = self.plugins.get("backend") or cfg.backend
        timeout = float(self.launch.get("boot_timeout", 120.0))
        restore = self.launch.get("restore")
        if restore:   # a snapshot restore or fork (microvm.sandbox._snapshots)
            self._phase("checks_start")
            machine = await asyncio.to_thread(
                Machine.from_snapshot, Path(restore["snapshot"]), backend=backend,
                rundir=self.paths.run, disk_dir=self.paths.root, net_socket=net_socket,
                hostname=bootstrap["hostname"], boot_timeout=timeout)
        else:
            # with a network, the guest's MAC is its address plan's: the agent sets it
            # from the network config
            machine = Machine(
                backend, cpus=cfg.cpus, memory=cfg.memory, net_socket=net_socket,
                shares=self._shares(), bootstrap=bootstrap, rundir=self.paths.run,
                root=self.root_plan, boot_timeout=timeout)
        self._phase("vmm_start")
        return machine

    async def _start(self, bootstrap: dict[str, Any]) -> Any:
        """A sandbox without a network: boot (or restore) the machine."""
        self.machine = await self._new_machine(bootstrap)
        return await self.machine.astart()

    async def _start_with_network(self, bootstrap: dict[str, Any]) -> Any:
        """Start the VMM at once and build the network (slot, uplink, gateway, TLS proxy)
        while the guest boots: its config goes with the boot config, after the agent's
        hello. A restore copies its disks and loads its snapshot meanwhile, and gets its
        new address in ``core.reconfigure``. A network failure stops the boot and fails
        the start with its own error."""
        net_sock = self.paths.run / "net.sock"
        with contextlib.suppress(FileNotFoundError):
            net_sock.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(net_sock))   # the VMM connects when it starts
            listener.listen(1)
        except BaseException:
            listener.close()
            raise
        net_config: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        net = asyncio.ensure_future(self._network(listener, net_config))
        boot: asyncio.Future[Any] | None = None
        try:
            # a restore or fork copies its disks meanwhile, and gets its new address in
            # core.reconfigure
            self.machine = await self._new_machine(bootstrap, net_sock)
            boot = asyncio.ensure_future(self.machine.astart(net_config))
            await asyncio.wait({boot, net}, return_when=asyncio.FIRST_EXCEPTION)
            if net.done() and not net.cancelled() and net.exception() is not None:
                boot.cancel()  # fail now, not at the guest's hello
            client = await boot
            await net
            return client
        except BaseException:
            if boot is not None and not boot.done():
                boot.cancel()
            with contextlib.suppress(BaseException):
                if boot is not None:
                    await boot
            if self.net is None and not net.done():
                # building the uplink cannot be interrupted: let it finish, so that the
                # teardown removes what it made
                with contextlib.suppress(BaseException):
                    await asyncio.shield(net)
            if not net.done():
                net.cancel()
                with contextlib.suppress(BaseException):
                    await net
            if net_config.done() and not net_config.cancelled():
                net_config.exception()  # retrieved: the network task raises it
            exc = net.exception() if net.done() and not net.cancelled() else None
            if exc is not None:
                raise exc from None
            raise

    async def _network(self, listener: socket.socket,
                       config: asyncio.Future[dict[str, Any]]) -> None:
        """Slot, uplink and CA (their guest config resolves ``config``), then the gateway
        and the TLS proxy once the VMM connected."""
        cfg = self.cfg

        def prepare() -> SandboxNet:
            from microvm.sandbox._netwiring import SandboxNet

            return SandboxNet.prepare(cfg.name, cfg.policy(), listener, secrets=self.secrets,
                                      ports=cfg.ports, uplink_factory=self.plugins.get("uplink"))

        try:
            self.net = await asyncio.to_thread(prepare)
        except BaseException as e:
            listener.close()
            if isinstance(e, Exception):
                config.set_exception(e)
            else:
                config.cancel()
            raise
        extra: dict[str, Any] = {"network": self.net.guest_config()}
        pem = self.net.ca_pem()
        if pem:
            extra["ca_certs"] = [pem]
        config.set_result(extra)
        await self.net.accept(ports=cfg.ports, dns=cfg.dns, tls=cfg.tls, secrets=self.secrets,
                              pcap=cfg.pcap, proxy_factory=self.plugins.get("secret_proxy"))

    async def _install_scripts(self, client: Any) -> None:
        for name, body in self.cfg.scripts.items():
            await client.write_file(f"/.microvm/scripts/{name}", body.encode(), mode=0o755,
                                    mkdirs=True)

    def _touch(self) -> None:
        self.last_touch = time.monotonic()

    # -- control socket ------------------------------------------------------------
    async def _control_client(self, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    req = json.loads(line)
                    result = await self._control(req)
                    reply: dict[str, Any] = {"ok": True, "result": result}
                except Exception as e:
                    reply = {"ok": False, "error": type(e).__name__, "message": str(e)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _control(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        if op == "status":
            return {"state": "running", "pid": os.getpid(), "paused": self.paused,
                    "uptime": time.monotonic() - self.started,
                    "published": self.net.published() if self.net else {},
                    "guest": str(self.net.plan.guest_ipv4) if self.net else None}
        if op in ("stop", "kill"):
            self.request_stop(op, float(req.get("timeout", 10.0)), "requested")
            return {"stopping": True}
        if op == "net_stats":
            return self.net.stats() if self.net else {}
        if op == "rule_counters":
            return self.net.rule_counters() if self.net else []
        if op == "touch":
            self._touch()
            return {}
        if op in ("pause", "resume", "snapshot"):
            return await self._snapshot_op(op, req)
        if op == "fork_template":
            return await self._fork_template(Path(str(req["path"])), req.get("extra"))
        if op == "fork_release":
            for fd in self._template_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._template_fds.clear()
            return {}
        raise control.ControlError(f"unknown control op {op!r}")

    async def _snapshot_op(self, op: str, req: dict[str, Any]) -> Any:
        """``pause``/``resume`` the guest, or ``snapshot {path, extra?, checksums?}`` it
        (a paused guest stays paused); see microvm.sandbox._snapshots."""
        assert self.machine is not None
        if op == "pause":
            await asyncio.to_thread(self.machine.pause)
            self.paused = True
            return {"paused": True}
        if op == "resume":
            await asyncio.to_thread(self.machine.resume)
            self.paused = False
            return {"paused": False}
        manifest = await asyncio.to_thread(
            self.machine.snapshot, Path(str(req["path"])), extra=req.get("extra"),
            checksums=bool(req.get("checksums", True)))
        if self.paused:
            await asyncio.to_thread(self.machine.pause)
        return {"paused_s": manifest["paused_s"]}

    async def _fork_template(self, target: Path, extra: Any) -> dict[str, Any]:
        """Freeze this sandbox into the fork template ``target`` and carry on as a
        copy-on-write child of it (see :func:`microvm._snapshot.freeze`): the guest's RAM
        memfd becomes the template, unchanged and never copied; a new VMM maps it private,
        loads the device state and gets a fresh entropy reseed and the clock, and the
        relay is rebuilt on it (clients reconnect on their next request). Returns
        ``{"cow": false}`` without touching anything when the RAM is a private mapping
        already (a restore, an earlier fork's source), a network is attached (the gateway
        cannot be handed to a new VMM yet) or exec sessions are in flight, and unless the
        sandbox was started with ``MICROVM_FORK_IN_PLACE=1`` (opt-in: a source frozen in
        place forks 4-6x slower afterwards, see the README): the caller snapshots
        instead.
        """
        old = self.machine
        assert old is not None and self.relay is not None
        if (self.net is not None or self.relay.sessions > 0 or old.spec.memory_file is None
                or not old.spec.memory_shared or getattr(old, "_memfd", None) is None
                or os.environ.get("MICROVM_FORK_IN_PLACE") != "1"):
            # a private mapping already (a restore, an earlier fork's source): freezing it
            # would mean streaming its RAM and restarting it twice (measured 4-7x slower
            # than the caller's snapshot); see the README
            return {"cow": False}
        t0 = time.monotonic()
        self._swapping = True
        try:
            freeze_s = await self._replace_vmm(target, extra)
        finally:
            self._swapping = False
        return {"cow": True, "paused_s": round(time.monotonic() - t0, 4), "freeze_s": freeze_s}

    async def _replace_vmm(self, target: Path, extra: Any) -> float:
        """Freeze the VMM into ``target`` and restart the guest from it in a new VMM (same
        rundir, sockets and disk paths); on failure the old VMM carries on."""
        from microvm._snapshot import freeze, thaw
        from microvm.backends._qmp import QmpClient
        from microvm.sandbox._relay import AgentRelay

        old = self.machine
        assert old is not None and self.relay is not None
        writable = [Path(d.path) for d in old.spec.disks if not d.readonly]
        manifest, memfd = await asyncio.to_thread(
            freeze, old, target, extra=extra if isinstance(extra, dict) else None)

        def undo_freeze() -> None:
            thaw(target, writable)
            if memfd >= 0:
                os.close(memfd)

        # the stopped VMM's monitor (one client at a time), kept open: the new VMM's socket
        # takes its path
        try:
            q_old = await asyncio.to_thread(QmpClient.connect, old.spec.qmp_socket)
        except BaseException:
            await asyncio.to_thread(undo_freeze)
            await asyncio.to_thread(old.resume)
            raise
        try:
            scratch = self.paths.root / f".cow-{time.monotonic_ns()}"
            await self.relay.close()
            backend = self.plugins.get("backend") or self.cfg.backend
            new: Machine | None = None
            try:
                new = await asyncio.to_thread(
                    Machine.from_snapshot, target, backend=backend, rundir=self.paths.run,
                    disk_dir=scratch, hostname=self.cfg.hostname or self.cfg.name,
                    boot_timeout=float(self.launch.get("boot_timeout", 120.0)))
                client = await new.astart()
            except BaseException:
                if new is not None:
                    await asyncio.to_thread(new.kill)
                shutil.rmtree(scratch, ignore_errors=True)
                await asyncio.to_thread(undo_freeze)
                await asyncio.to_thread(q_old.execute, "cont")
                up = old._aagent
                assert up is not None and up.ready is not None
                self.relay = AgentRelay(up, up.ready, on_activity=self._touch)
                await self.relay.serve_unix(self.paths.agent_sock)
                raise
        finally:
            q_old.close()
        # the child runs: the old VMM goes (SIGKILL: a "quit" would unlink the socket paths
        # the new VMM owns now)
        if old._aagent is not None:
            with contextlib.suppress(Exception):
                await old._aagent.close()
        await asyncio.to_thread(old.kill)
        # the child's disks are copies in `scratch` (QEMU may reopen a disk by its name:
        # they keep it); the sandbox's own disk paths become symlinks to them
        copies = [Path(d.path) for d in new.spec.disks if not d.readonly]
        if not self._disk_aliases:
            self._disk_aliases = writable
        for alias, real in zip(self._disk_aliases, copies, strict=True):
            link = alias.with_name(f".{alias.name}.lnk")
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            os.symlink(real, link)
            os.replace(link, alias)
        for w in writable:   # an earlier child's scratch directory, now empty
            if w.parent.name.startswith(".cow-"):
                with contextlib.suppress(OSError):
                    w.parent.rmdir()
        if memfd >= 0:
            self._template_fds.append(memfd)
        self.machine = new
        assert client.ready is not None
        self.relay = AgentRelay(client, client.ready, on_activity=self._touch)
        await self.relay.serve_unix(self.paths.agent_sock)
        if self.paused:
            await asyncio.to_thread(new.pause)
        return float(manifest["paused_s"])

    def request_stop(self, mode: str, timeout: float, reason: str) -> None:
        """Ask the serve loop to stop (``stop``: graceful within ``timeout``; ``kill``)."""
        if self.stop_requested is None or self.stop_requested.is_set():
            if mode == "kill":
                self.stop_mode = "kill"
            return
        self.stop_mode, self.stop_timeout, self.stop_reason = mode, timeout, reason
        self.stop_requested.set()

    # -- serve -----------------------------------------------------------------------
    async def serve(self, lifeline: asyncio.StreamReader | None) -> str:
        """Run until a stop request, a timer, the creator's death or the guest's exit.

        Returns the final state (``stopped`` or ``crashed``).
        """
        assert self.machine is not None and self.stop_requested is not None
        vm_exit = asyncio.ensure_future(self._vm_exit())
        stop = asyncio.ensure_future(self.stop_requested.wait())
        waits: set[asyncio.Future[Any]] = {vm_exit, stop}
        if lifeline is not None:
            waits.add(asyncio.ensure_future(lifeline.read()))
        timers = asyncio.ensure_future(self._timers())
        waits.add(timers)
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if vm_exit in done and not self.stop_requested.is_set():
            tail = console_tail(self.paths.console_log, 40)
            panicked = "Kernel panic" in tail or "panic" in tail.lower()
            state = "crashed" if panicked else "stopped"
            why = "the guest kernel panicked" if panicked else "the guest powered off"
            await self._teardown(kill=True)
            self.db.set_state(self.cfg.name, state,  # type: ignore[arg-type]
                              error=f"{why}; guest console tail:\n{tail}")
            return state
        if not self.stop_requested.is_set():
            self.request_stop("stop", 10.0, "the creating process exited")
        await self._teardown(kill=self.stop_mode == "kill")
        self.db.set_state(self.cfg.name, "stopped", error=self.stop_reason)
        for w in waits:
            w.cancel()
        return "stopped"

    async def _vm_exit(self) -> None:
        """Until the guest's VMM exits; a VMM replaced by ``fork_template`` is followed."""
        while True:
            machine = self.machine
            assert machine is not None
            await asyncio.to_thread(machine.wait)
            while self._swapping:
                await asyncio.sleep(0.01)
            if self.machine is machine:
                return

    async def _timers(self) -> None:
        cfg = self.cfg
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if cfg.max_duration is not None and now - self.started >= cfg.max_duration:
                self.request_stop("stop", 10.0, f"max_duration of {cfg.max_duration:g}s reached")
                return
            if cfg.idle_timeout is not None and self.relay is not None:
                busy = self.relay.sessions > 0
                last = max(self.last_touch, self.relay.last_activity)
                if busy:
                    self._touch()
                elif now - last >= cfg.idle_timeout:
                    self.request_stop("stop", 10.0,
                                      f"idle for {cfg.idle_timeout:g}s (idle_timeout)")
                    return

    async def _teardown(self, kill: bool) -> None:
        if self.control is not None:
            self.control.close()
        if self.relay is not None:
            with contextlib.suppress(Exception):
                await self.relay.close()
        if self.machine is not None:
            if kill:
                await asyncio.to_thread(self.machine.kill)
            else:
                try:
                    await asyncio.wait_for(self.machine.ashutdown(timeout=self.stop_timeout),
                                           self.stop_timeout + 5)
                except (TimeoutError, MicrovmError, OSError):
                    pass
                await asyncio.to_thread(self.machine.kill)
        if self.net is not None:
            await self.net.close()
        for fd in self._template_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._template_fds.clear()
        for p in (self.paths.agent_sock, self.paths.control_sock):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _read_secrets(stdin: Any) -> list[dict[str, Any]]:
    """The secrets line as dicts (``Supervisor.secrets`` builds them once tls_proxy loads)."""
    line = stdin.readline()
    if not line.strip():
        return []
    items: list[dict[str, Any]] = json.loads(line)
    return items


def _report(msg: dict[str, Any]) -> None:
    try:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()
        sys.stdout.close()
        os.close(1)
    except OSError:
        pass
    # anything later written to stdout goes to the log instead
    with contextlib.suppress(OSError):
        os.dup2(2, 1)


def _forget_stop_signals(signals: tuple[signal.Signals, ...]) -> None:
    """In a forked child (pyroute2 forks one per namespace operation, and SIGTERMs it when
    done): default dispositions and no wakeup fd, else the child's signal would be written
    into the loop's self-pipe it shares with us and stop the sandbox ("signal SIGTERM")."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
        for sig in signals:
            signal.signal(sig, signal.SIG_DFL)


async def _amain(paths: SandboxPaths) -> int:
    sup_t0 = time.time()
    launch = json.loads((paths.dir / "launch.json").read_text())
    secrets = _read_secrets(sys.stdin)
    sup = Supervisor(paths, launch, secrets)
    sup.phases["main"] = sup_t0
    sup._phase("secrets")
    db, name = sup.db, sup.cfg.name
    loop = asyncio.get_running_loop()
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in stop_signals:
        loop.add_signal_handler(sig, sup.request_stop, "stop", 10.0, f"signal {sig.name}")
    os.register_at_fork(after_in_child=lambda: _forget_stop_signals(stop_signals))
    lifeline: asyncio.StreamReader | None = None
    if not sup.cfg.detached:
        lifeline = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lifeline), sys.stdin)
    try:
        await sup.up()
    except BaseException as e:
        log.error("sandbox %s did not start: %s", name, e)
        tail = getattr(e, "console_tail", "")
        with contextlib.suppress(BaseException):
            await sup._teardown(kill=True)
        db.set_state(name, "crashed", error=str(e))
        _report({"ok": False, "error": type(e).__name__, "message": str(e),
                 "console_tail": tail})
        return 1
    db.set_state(name, "running", pid=os.getpid())
    _report({"ok": True, "pid": os.getpid(), "phases": sup.phases,
             "published": sup.net.published() if sup.net else {}})
    state = await sup.serve(lifeline)
    log.info("sandbox %s %s (%s)", name, state, sup.stop_reason)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the supervisor process (see the module docstring).

    Example::

        python -m microvm.sandbox._supervisor /root/.microvm/sandboxes/web
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m microvm.sandbox._supervisor SANDBOX_DIR", file=sys.stderr)
        return 2
    paths = SandboxPaths(Path(args[0]))
    level = "info"
    with contextlib.suppress(OSError, ValueError, KeyError):
        level = json.loads(json.loads((paths.dir / "launch.json").read_text())["config"]
                           )["log_level"]
    logging.basicConfig(level=_LOG_LEVELS.get(level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(_amain(paths))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
