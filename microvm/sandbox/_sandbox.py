"""``Sandbox``: the blocking twin of :class:`~microvm.sandbox._asandbox.AsyncSandbox`.

Same names, same parameters, same results, without ``await``: each handle runs the async
core on its own :class:`~microvm._portal.Portal` (a private event loop in a daemon
thread: the project's one sync-over-async pattern, shared with ``SyncAgentClient`` and
``Machine.start``). Signatures are written out so that type checkers see every
parameter; tests/microvm/test_sync_twins.py compares them with the async ones.

Example::

    from microvm import Sandbox
    from rootfs import Patch

    with Sandbox.create("demo", image="localhost:5000/busybox:1", registry_insecure=True,
                        patches=[Patch.text("/etc/motd", "hi\\n")],
                        network={"default_egress": "deny", "rules": []}) as sb:
        print(sb.exec("/bin/cat", ["/etc/motd"]).stdout_text)      # hi
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import functools
import os
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from microvm._portal import Portal, run_once
from microvm.agent import ExecEvent, FileStat
from microvm.sandbox._asandbox import (
    AsyncSandbox,
    PortsArg,
    ProxyFactory,
    Rlimits,
    SandboxInfo,
    UplinkFactory,
)
from microvm.sandbox._config import DnsOptions, TlsOptions
from microvm.sandbox._exec import AsyncExecHandle, ExecOutput

if TYPE_CHECKING:   # types only: a handle never needs the gateway or the proxy
    from microvm.backends.base import Backend
    from microvm.sandbox._snapshots import SnapshotInfo
    from microvm.ssh._client import SshClient
    from netstack import Decision, Flow, NetworkPolicy
    from rootfs import Image, Patch, RegistryAuth, RootProvider
    from tls_proxy import Secret

__all__ = ["ExecHandle", "Sandbox", "SandboxFs", "SandboxNetwork"]


#: open sync handles: their agent connections are closed at interpreter exit (a daemon
#: loop thread would otherwise die with pending tasks and warnings)
_LIVE: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@atexit.register
def _close_live_handles() -> None:
    for sb in list(_LIVE):
        with contextlib.suppress(Exception):
            sb.close()


async def _anext(agen: AsyncIterator[ExecEvent]) -> ExecEvent:
    return await agen.__anext__()


class ExecHandle:
    """Blocking twin of :class:`~microvm.sandbox._exec.AsyncExecHandle`.

    Example::

        h = sb.exec_stream("/bin/cat")
        h.stdin.write(b"hi"); h.stdin.close()
        print(h.wait().stdout)
    """

    def __init__(self, loop: Portal, handle: AsyncExecHandle) -> None:
        self._loop = loop
        self._h = handle
        self.stdin = ExecStdin(loop, handle)

    @property
    def pid(self) -> int:
        """The process id in the guest.

        Example::

            print(h.pid)
        """
        return self._h.pid

    def events(self) -> Iterator[ExecEvent]:
        """Events as they come (``started``, ``stdout``, ``stderr``, ``exited``, ...).

        Example::

            for ev in h.events():
                print(ev.kind, ev.data)
        """
        agen = self._h.events()
        while True:
            try:
                yield self._loop.run(_anext(agen))
            except StopAsyncIteration:
                return

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group.

        Example::

            h.signal(15)
        """
        self._loop.run(self._h.signal(sig))

    def kill(self) -> None:
        """SIGKILL the process group.

        Example::

            h.kill()
        """
        self._loop.run(self._h.kill())

    def resize(self, rows: int, cols: int) -> None:
        """Resize a ``tty=True`` exec's terminal.

        Example::

            h.resize(40, 120)
        """
        self._loop.run(self._h.resize(rows, cols))

    def wait(self, timeout: float | None = None) -> ExecOutput:
        """Wait for the exit and collect what :meth:`events` did not consume.

        Example::

            out = h.wait()
        """
        return self._loop.run(self._h.wait(timeout))


class ExecStdin:
    """Blocking stdin writer of an :class:`ExecHandle`.

    Example::

        h.stdin.write("line\\n"); h.stdin.close()
    """

    def __init__(self, loop: Portal, handle: AsyncExecHandle) -> None:
        self._loop = loop
        self._h = handle

    def write(self, data: bytes | str) -> None:
        """Send bytes (a str is UTF-8 encoded).

        Example::

            h.stdin.write(b"x")
        """
        self._loop.run(self._h.stdin.write(data))

    def close(self) -> None:
        """Send EOF.

        Example::

            h.stdin.close()
        """
        self._loop.run(self._h.stdin.close())


class SandboxFs:
    """Blocking twin of :class:`~microvm.sandbox._fs.AsyncSandboxFs`.

    Example::

        sb.fs.write("/tmp/x", "hi"); assert sb.fs.read_text("/tmp/x") == "hi"
    """

    def __init__(self, loop: Portal, sb: AsyncSandbox) -> None:
        self._loop = loop
        self._fs = sb.fs

    def read(self, path: str) -> bytes:
        """The whole file.

        Example::

            sb.fs.read("/etc/hostname")
        """
        return self._loop.run(self._fs.read(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The whole file, decoded.

        Example::

            sb.fs.read_text("/etc/hostname")
        """
        return self._loop.run(self._fs.read_text(path, encoding))

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644,
              mkdirs: bool = False) -> int:
        """Create or replace ``path``.

        Example::

            sb.fs.write("/tmp/a", b"x", mkdirs=True)
        """
        return self._loop.run(self._fs.write(path, data, mode=mode, mkdirs=mkdirs))

    def list(self, path: str) -> builtins.list[FileStat]:
        """Directory entries.

        Example::

            [e.name for e in sb.fs.list("/")]
        """
        return self._loop.run(self._fs.list(path))

    def stat(self, path: str, *, follow: bool = True) -> FileStat:
        """Metadata of ``path``.

        Example::

            sb.fs.stat("/bin/sh").size
        """
        return self._loop.run(self._fs.stat(path, follow=follow))

    def exists(self, path: str) -> bool:
        """True when ``path`` exists.

        Example::

            sb.fs.exists("/etc")
        """
        return self._loop.run(self._fs.exists(path))

    def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = False) -> None:
        """Create a directory.

        Example::

            sb.fs.mkdir("/data/x", parents=True)
        """
        self._loop.run(self._fs.mkdir(path, mode=mode, parents=parents))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file or (``recursive``) a tree.

        Example::

            sb.fs.remove("/tmp/x")
        """
        self._loop.run(self._fs.remove(path, recursive=recursive))

    def rename(self, src: str, dst: str) -> None:
        """Rename within the guest.

        Example::

            sb.fs.rename("/tmp/a", "/tmp/b")
        """
        self._loop.run(self._fs.rename(src, dst))

    def copy(self, src: str, dst: str, *, recursive: bool = False) -> None:
        """Copy within the guest.

        Example::

            sb.fs.copy("/etc/hosts", "/tmp/hosts")
        """
        self._loop.run(self._fs.copy(src, dst, recursive=recursive))

    def copy_from_host(self, host_path: str | os.PathLike[str], guest_path: str, *,
                       mode: int | None = None, mkdirs: bool = False) -> int:
        """Stream a host file into the guest.

        Example::

            sb.fs.copy_from_host("app.py", "/app/app.py", mkdirs=True)
        """
        return self._loop.run(self._fs.copy_from_host(host_path, guest_path, mode=mode,
                                                      mkdirs=mkdirs))

    def copy_to_host(self, guest_path: str, host_path: str | os.PathLike[str]) -> int:
        """Stream a guest file to the host.

        Example::

            sb.fs.copy_to_host("/var/log/app.log", "app.log")
        """
        return self._loop.run(self._fs.copy_to_host(guest_path, host_path))


class SandboxNetwork:
    """Blocking twin of :class:`~microvm.sandbox._asandbox.AsyncSandboxNetwork`.

    Example::

        print(sb.network.explain(Flow("egress", "tcp", "169.254.169.254", 80)))
    """

    def __init__(self, loop: Portal, sb: AsyncSandbox) -> None:
        self._loop = loop
        self._net = sb.network
        #: the pcap file, when asked for with ``pcap=``
        self.pcap: Path | None = sb.network.pcap

    @functools.cached_property
    def policy(self) -> NetworkPolicy:
        """The policy the gateway enforces (built on first use).

        Example::

            print(sb.network.policy.default_egress)
        """
        return self._net.policy

    def evaluate(self, flow: Flow) -> Decision:
        """The policy's decision for ``flow``.

        Example::

            sb.network.evaluate(Flow("egress", "tcp", "203.0.113.7", 443)).action
        """
        return self._net.evaluate(flow)

    def explain(self, flow: Flow) -> str:
        """Why ``flow`` is allowed or denied.

        Example::

            print(sb.network.explain(Flow("egress", "tcp", "10.0.0.1", 22)))
        """
        return self._net.explain(flow)

    def stats(self) -> dict[str, Any]:
        """The gateway's counters.

        Example::

            sb.network.stats()["rst_sent"]
        """
        return self._loop.run(self._net.stats())

    def rule_counters(self) -> builtins.list[dict[str, Any]]:
        """Per-rule hits/packets/bytes.

        Example::

            [c["hits"] for c in sb.network.rule_counters()]
        """
        return self._loop.run(self._net.rule_counters())


class Sandbox:
    """One sandbox, blocking API (see :class:`~microvm.sandbox._asandbox.AsyncSandbox`).

    Example (a one-layer image built offline; leaving ``with`` stops and removes it)::

        >>> import shutil
        >>> from pathlib import Path
        >>> from microvm import Sandbox
        >>> from rootfs import ImageStore, build_image
        >>> (Path("bb") / "bin").mkdir(parents=True)
        >>> _ = shutil.copy("/bin/busybox", "bb/bin/busybox")
        >>> (Path("bb") / "bin/sh").symlink_to("busybox")
        >>> image = build_image(Path("bb"), "local/busybox:1", ImageStore(),
        ...                     config={"Cmd": ["/bin/sh", "-c", "echo hello"]})
        >>> with Sandbox.create("doc-sb", image=image, network="none", memory=256) as sb:
        ...     print(sb.shell("echo hi from $(hostname)").stdout_text.strip())
        ...     print(sb.exec_default().stdout_text.strip())
        hi from doc-sb
        hello

    A detached sandbox outlives this process (``Sandbox.get("web")`` from anywhere)::

        sb = Sandbox.create("web", image="busybox:1.36", detached=True)
        print(sb.shell("uname -r").stdout_text)
        sb.stop()
    """

    def __init__(self, inner: AsyncSandbox, loop: Portal | None = None) -> None:
        self._loop = loop or Portal("sandbox")
        self._sb = inner
        self.name = inner.name
        self.config = inner.config
        self.paths = inner.paths
        self.fs = SandboxFs(self._loop, inner)
        self.network = SandboxNetwork(self._loop, inner)
        _LIVE.add(self)

    @classmethod
    def _wrap(cls, coro: Coroutine[Any, Any, AsyncSandbox]) -> Sandbox:
        loop = Portal("sandbox")
        try:
            return cls(loop.run(coro), loop)
        except BaseException:
            loop.close()
            raise

    @classmethod
    def create(
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
    ) -> Sandbox:
        """Create and start a sandbox (see :meth:`AsyncSandbox.create`).

        Example::

            sb = Sandbox.create("web", image="busybox:1.36", network="none")
        """
        return cls._wrap(AsyncSandbox.create(
            name, image=image, cpus=cpus, memory=memory, env=env, workdir=workdir, shell=shell,
            user=user, hostname=hostname, labels=labels, entrypoint=entrypoint, cmd=cmd,
            scripts=scripts, ports=ports, volumes=volumes, network=network, patches=patches,
            secrets=secrets, pull_policy=pull_policy, registry_auth=registry_auth,
            registry_insecure=registry_insecure, registry_ca_certs=registry_ca_certs,
            upper_size_mib=upper_size_mib, max_duration=max_duration, idle_timeout=idle_timeout,
            rlimits=rlimits, log_level=log_level, detached=detached, replace=replace,
            replace_with_timeout=replace_with_timeout, backend=backend, dns=dns, tls=tls,
            pcap=pcap, root_provider=root_provider, uplink=uplink, secret_proxy=secret_proxy,
            boot_timeout=boot_timeout))

    @classmethod
    def start(cls, name: str, *, secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
              detached: bool | None = None, boot_timeout: float = 120.0) -> Sandbox:
        """Start a stopped sandbox again (see :meth:`AsyncSandbox.start`).

        Example::

            sb = Sandbox.start("web")
        """
        return cls._wrap(AsyncSandbox.start(name, secrets=secrets, detached=detached,
                                            boot_timeout=boot_timeout))

    @classmethod
    def get(cls, name: str) -> Sandbox:
        """A handle on an existing sandbox.

        Example::

            sb = Sandbox.get("web")
        """
        return cls._wrap(AsyncSandbox.get(name))

    @classmethod
    def list(cls, labels: Mapping[str, str] | None = None) -> builtins.list[SandboxInfo]:
        """Every sandbox (or those carrying all ``labels``).

        Example::

            [i.name for i in Sandbox.list(labels={"team": "a"})]
        """
        return run_once(AsyncSandbox.list(labels=labels))

    @classmethod
    def remove(cls, name: str, *, timeout: float = 10.0) -> None:
        """Stop ``name`` if needed and delete everything it owns (named volumes stay).

        Example::

            Sandbox.remove("web")
        """
        run_once(AsyncSandbox.remove(name, timeout=timeout))

    def info(self) -> SandboxInfo:
        """The current record.

        Example::

            sb.info().state
        """
        return self._sb.info()

    @property
    def state(self) -> str:
        """``created``, ``running``, ``stopped`` or ``crashed``.

        Example::

            sb.state
        """
        return self._sb.state

    def exec(self, cmd: str, args: Sequence[str] = (), *, cwd: str | None = None,
             user: str | int | None = None, env: Mapping[str, str] | None = None,
             timeout: float | None = None, stdin: bytes | str | None = None,
             tty: bool = False, rlimits: Rlimits | None = None) -> ExecOutput:
        """Run a command to completion (see :meth:`AsyncSandbox.exec`).

        Example::

            sb.exec("/bin/echo", ["hi"]).stdout_text
        """
        return self._loop.run(self._sb.exec(cmd, args, cwd=cwd, user=user, env=env,
                                            timeout=timeout, stdin=stdin, tty=tty,
                                            rlimits=rlimits))

    def exec_stream(self, cmd: str, args: Sequence[str] = (), *, cwd: str | None = None,
                    user: str | int | None = None, env: Mapping[str, str] | None = None,
                    timeout: float | None = None, stdin: bool = True, tty: bool = False,
                    rows: int = 24, cols: int = 80, rlimits: Rlimits | None = None) -> ExecHandle:
        """Start a command and return its handle (see :meth:`AsyncSandbox.exec_stream`).

        Example::

            h = sb.exec_stream("/bin/cat"); h.stdin.close(); h.wait()
        """
        return ExecHandle(self._loop, self._loop.run(self._sb.exec_stream(
            cmd, args, cwd=cwd, user=user, env=env, timeout=timeout, stdin=stdin, tty=tty,
            rows=rows, cols=cols, rlimits=rlimits)))

    def shell(self, script: str, *, cwd: str | None = None, user: str | int | None = None,
              env: Mapping[str, str] | None = None, timeout: float | None = None,
              stdin: bytes | str | None = None) -> ExecOutput:
        """Run a script with the sandbox's shell.

        Example::

            sb.shell("echo $((1+1))").stdout_text
        """
        return self._loop.run(self._sb.shell(script, cwd=cwd, user=user, env=env,
                                             timeout=timeout, stdin=stdin))

    def default_command(self) -> builtins.list[str]:
        """``entrypoint + cmd`` (the sandbox's overrides, else the image's).

        Example::

            sb.default_command()
        """
        return self._sb.default_command()

    def exec_default(self, *, timeout: float | None = None,
                     stdin: bytes | str | None = None) -> ExecOutput:
        """Run the image's entrypoint + cmd.

        Example::

            sb.exec_default().exit_code
        """
        return self._loop.run(self._sb.exec_default(timeout=timeout, stdin=stdin))

    def metrics(self) -> dict[str, Any]:
        """The guest's figures.

        Example::

            sb.metrics()["uptime_ms"]
        """
        return self._loop.run(self._sb.metrics())

    def logs(self, *, tail: int | None = None, source: str = "console") -> str:
        """The guest console or the supervisor log.

        Example::

            print(sb.logs(tail=20))
        """
        return self._sb.logs(tail=tail, source=source)

    def published_ports(self) -> dict[str, int]:
        """Host ports actually bound (``{"tcp:80": 8080}``).

        Example::

            sb.published_ports()["tcp:80"]
        """
        return self._loop.run(self._sb.published_ports())

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the guest down; killed if not gone within ``timeout``.

        Example::

            sb.stop()
        """
        self._loop.run(self._sb.stop(timeout))

    def kill(self) -> None:
        """Stop at once.

        Example::

            sb.kill()
        """
        self._loop.run(self._sb.kill())

    def wait(self, timeout: float | None = None) -> str:
        """Wait until it is no longer running; the final state.

        Example::

            sb.wait(60)
        """
        return self._loop.run(self._sb.wait(timeout))

    def close(self) -> None:
        """Drop this handle (the sandbox keeps running).

        Example::

            sb.close()
        """
        if self._loop.closed:
            return
        try:
            self._loop.run(self._sb.close())
        finally:
            self._loop.close()
            _LIVE.discard(self)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._loop.run(self._sb.__aexit__(exc_type, exc, tb))
        finally:
            self._loop.close()
            _LIVE.discard(self)

    def __repr__(self) -> str:
        return f"Sandbox({self.name!r})"

    def snapshot(self, name: str, *, checksums: bool = True,
                 disk_only: bool = False) -> SnapshotInfo:
        """Save this running sandbox as snapshot ``name`` (see :meth:`AsyncSandbox.snapshot`;
        ``disk_only=True``: the upper disk and the pinned image, no memory).

        Example::

            sb.snapshot("warm")
            sb.snapshot("after-setup", disk_only=True)
        """
        return self._loop.run(self._sb.snapshot(name, checksums=checksums, disk_only=disk_only))

    @classmethod
    def restore(cls, snapshot: str | os.PathLike[str], *, name: str,
                secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
                detached: bool = False, labels: Mapping[str, str] | None = None,
                boot_timeout: float = 120.0) -> Sandbox:
        """A new sandbox from a snapshot (see :meth:`AsyncSandbox.restore`).

        Example::

            a = Sandbox.restore("warm", name="a")
        """
        return cls._wrap(AsyncSandbox.restore(snapshot, name=name, secrets=secrets,
                                              detached=detached, labels=labels,
                                              boot_timeout=boot_timeout))

    def fork(self, *, name: str | None = None,
             secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
             detached: bool = False) -> Sandbox:
        """A copy of this running sandbox (see :meth:`AsyncSandbox.fork`).

        Example::

            child = sb.fork()
        """
        inner = self._loop.run(self._sb.fork(name=name, secrets=secrets, detached=detached))
        return Sandbox._wrap(AsyncSandbox.get(inner.name))

    def fork_many(self, n: int, *, names: Sequence[str] | None = None,
                  secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
                  detached: bool = False) -> builtins.list[Sandbox]:
        """``n`` forks of this running sandbox (see :meth:`AsyncSandbox.fork_many`).

        Example::

            forks = sb.fork_many(5)
        """
        inner = self._loop.run(self._sb.fork_many(n, names=names, secrets=secrets,
                                                  detached=detached))
        return [Sandbox._wrap(AsyncSandbox.get(f.name)) for f in inner]

    def pause(self) -> None:
        """Freeze the guest (see :meth:`AsyncSandbox.pause`).

        Example::

            sb.pause()
        """
        self._loop.run(self._sb.pause())

    def resume(self) -> None:
        """Run a paused guest again, clock stepped (see :meth:`AsyncSandbox.resume`).

        Example::

            sb.resume()
        """
        self._loop.run(self._sb.resume())

    def ssh(self, *, idle_timeout: float | None = None) -> SshClient:
        """A connected paramiko client into the guest over a socket pair (no TCP port, no
        sshd in the guest): ``exec(cmd) -> (status, stdout, stderr)``, ``shell()``,
        ``sftp()``; see :mod:`microvm.ssh`.

        Example::

            with sb.ssh() as ssh:
                status, out, err = ssh.exec("uname -r")
        """
        from microvm.ssh._client import connect

        return connect(self._sb, idle_timeout=idle_timeout)
