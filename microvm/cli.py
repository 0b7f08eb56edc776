"""The ``microvm`` command: the group, ``microvm kernel fetch|path`` and ``microvm vm run``.

The docker-like commands live in ``microvm._cli_sandbox`` (run, create, start, exec,
shell, attach), ``_cli_manage`` (ls, stop, rm, logs, inspect, cp, net...), ``_cli_images``,
``_cli_snapshot``, ``_cli_doctor``, ``microvm.ssh._cli`` and ``microvm.fleet._cli``; each
module is imported only when one of its commands runs (:class:`LazyGroup`).

Exit status: 0 on success; 2 for a bad command line or environment (one line on
stderr, nothing started); 1 when a ``kernel`` operation fails; ``vm run`` exits
with CMD's status, 125 when the VM could not run it, 128+N when it was stopped by
signal N (the VM and its temporary directory are cleaned up first). The sandbox
commands follow docker: 125 ours, 126/127 cannot run / not found, else CMD's status.

Example::

    microvm kernel fetch --dest vendor
    microvm vm run --rootfs-dir ./rootfs --cpus 2 --memory 512 -- /bin/sh -c 'echo hi'
    microvm run --rm busybox:1.36 echo hi
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import click

from microvm.errors import MicrovmError

if TYPE_CHECKING:
    from microvm.backends.base import Share

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "EXIT_VM", "LazyGroup", "cli", "main", "run_command"]

EXIT_USAGE = 2
"""Bad command line or environment: detected before anything starts."""
EXIT_FAILED = 1
"""The operation itself failed (e.g. the kernel could not be fetched)."""
EXIT_VM = 125
"""``vm run``: the VM could not run CMD (backend unavailable, boot failure, agent lost)."""


def _one_line(text: str) -> str:
    return "; ".join(ln.strip() for ln in str(text).splitlines() if ln.strip())


def _home_problem() -> str | None:
    """Why ``$MICROVM_HOME`` cannot be the state directory (without creating anything), or None."""
    raw = os.environ.get("MICROVM_HOME")
    if not raw:
        return None
    p = Path(raw)
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == p else f" ({str(probe)!r} is a file)"
        return (
            f"MICROVM_HOME={raw!r} is not a directory{where}: point it at a directory "
            "(created if missing) or unset it (default ~/.microvm)"
        )
    return None


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the ``microvm`` command line (the console script); never returns.

    Every error is one line on stderr, never a traceback: usage and environment
    errors exit 2, failed operations 1 (see the module docstring).

    Example::

        main(["kernel", "path"])
    """
    if argv is None:      # the process's own command line (console script, python -m)
        from microvm import _cli_util as cli_util

        cli_util.PROGRAM = True
        # httpx (rootfs's registry client, imported by every sandbox start) loads its own
        # command line, rich and pygments, for `httpx.main`: 45-50 ms of CPU per `microvm
        # run` for a function nobody here calls. A None entry makes that optional import
        # fail, which httpx handles (its `main` becomes a stub); rich itself stays
        # importable (the pull progress bars).
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    try:
        problem = _home_problem()
        if problem:
            raise click.UsageError(problem)
        rv = cli.main(args=list(argv) if argv is not None else None, prog_name="microvm",
                      standalone_mode=False)  # fmt: skip
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(0)
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"microvm: error: {_one_line(e.format_message())}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as e:
        click.echo(f"microvm: error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("microvm: aborted", err=True)
        sys.exit(130)
    except MicrovmError as e:
        click.echo(f"microvm: {type(e).__name__}: {_one_line(str(e))}", err=True)
        sys.exit(EXIT_FAILED)
    except OSError as e:
        click.echo(f"microvm: error: {_one_line(str(e))}", err=True)
        sys.exit(EXIT_FAILED)
    sys.exit(rv if isinstance(rv, int) else 0)


#: which module provides each top-level command (``module:register function`` adds them
#: all to the group, ``module:attribute`` is one command): only the module of the command
#: being run is imported (``microvm exec`` never loads the image or doctor commands);
#: ``--help`` and completion load them all. ``tests/microvm/test_cli_lazy.py`` checks
#: that this table names exactly what the modules register.
_LAZY_SOURCES: dict[str, str] = {
    **dict.fromkeys(("run", "create", "start", "exec", "shell", "attach"),
                    "microvm._cli_sandbox:register"),
    **dict.fromkeys(("ls", "ps", "stop", "kill", "rm", "logs", "inspect", "stats", "cp", "net"),
                    "microvm._cli_manage:register"),
    **dict.fromkeys(("image", "pull", "images", "rmi", "volume", "system"),
                    "microvm._cli_images:register"),
    **dict.fromkeys(("snapshot", "fork", "pause", "resume"), "microvm._cli_snapshot:register"),
    "doctor": "microvm._cli_doctor:doctor_cmd",
    "ssh": "microvm.ssh._cli:ssh",
    "fleet": "microvm.fleet._cli:fleet",
}


class LazyGroup(click.Group):
    """The ``microvm`` group: a command's module is imported when that command is looked up.

    Example::

        @click.group(cls=LazyGroup)
        def cli() -> None: ...
        cli.get_command(ctx, "run")      # imports microvm._cli_sandbox only
    """

    def _load(self, source: str) -> None:
        module, _, attr = source.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        if isinstance(obj, click.Command):
            self.add_command(obj)
        else:
            obj(self)
        _add_version(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, importing its module on first use."""
        if cmd_name not in self.commands and cmd_name in _LAZY_SOURCES:
            self._load(_LAZY_SOURCES[cmd_name])
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command name (imports every command module)."""
        for source in dict.fromkeys(_LAZY_SOURCES.values()):
            if not all(n in self.commands for n, s in _LAZY_SOURCES.items() if s == source):
                self._load(source)
        return super().list_commands(ctx)


@click.group(cls=LazyGroup)
@click.version_option(package_name="microvm-sandbox", prog_name="microvm",
                      message="%(prog)s %(version)s")
def cli() -> None:
    """Boot microVMs and run commands in them.

    \b
    Example:
        microvm kernel fetch
        microvm vm run --rootfs-dir ./rootfs -- /bin/sh -c 'echo hi'
    """


@cli.group()
def kernel() -> None:
    """The guest kernel (libkrunfw).

    Example: microvm kernel fetch --dest vendor
    """


def _dest_ok(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    from microvm.kernel import check_dest

    if value is None:
        return None
    try:
        return check_dest(value)
    except MicrovmError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param)


@kernel.command("fetch")
@click.option(
    "--dest",
    type=click.Path(path_type=Path),
    default=None,
    callback=_dest_ok,
    help="target directory (default $MICROVM_HOME/kernel)",
)
@click.option("--source", type=click.Choice(["auto", "system", "debian", "wheel"]), default="auto",
              show_default=True, help="where libkrunfw comes from (auto: the system library, "
                                      "then Debian's package, then the PyPI wheel)")
@click.option("--force", is_flag=True, help="fetch again even if present")
def kernel_fetch(dest: Path | None, source: str, force: bool) -> None:
    """Fetch libkrunfw (pinned sha256) and write the PVH ELF QEMU boots.

    Example: microvm kernel fetch --source debian --dest vendor
    """
    from microvm.kernel import fetch_kernel

    k = fetch_kernel(dest, source=source, force=force)
    click.echo(f"kernel: {k.elf} (from {k.source}: {k.library})")


@kernel.command("path")
def kernel_path() -> None:
    """Print the path of the kernel ELF (exit 1 if not fetched).

    Example: qemu-system-x86_64 -kernel "$(microvm kernel path)" ...
    """
    from microvm.kernel import find_kernel

    try:
        k = find_kernel()
    except MicrovmError as e:  # MICROVM_KERNEL names no file
        raise click.UsageError(str(e))
    if k is None:
        raise click.ClickException("no kernel: run `microvm kernel fetch`")
    click.echo(str(k.elf))


@cli.group()
def vm() -> None:
    """Low-level machines (see microvm.Machine).

    Example: microvm vm run --rootfs-dir ./rootfs -- /bin/true
    """
    from microvm.backends.base import accel_override

    try:
        accel_override()
    except MicrovmError as e:
        raise click.UsageError(str(e))


def _not_nan(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and math.isnan(value):
        raise click.BadParameter(f"{value!r} is not a number of seconds", ctx=ctx, param=param)
    return value


@vm.command("run", context_settings={"ignore_unknown_options": True})
@click.option(
    "--rootfs-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="directory that becomes the guest's root (copied into a disk)",
)
@click.option("--cpus", type=click.IntRange(1, 32), default=1, show_default=True,
              help="virtual CPUs")
@click.option(
    "--memory",
    type=click.IntRange(64, 65536),
    default=512,
    show_default=True,
    help="guest RAM in MiB",
)
@click.option(
    "--backend", type=click.Choice(["qemu", "libkrun"]), default="qemu", show_default=True,
    help="the VMM",
)
@click.option("--env", "env", multiple=True, metavar="K=V", help="environment for CMD")
@click.option("--workdir", default="/", show_default=True, help="working directory of CMD")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True, max=10**7),
    default=None,
    callback=_not_nan,
    help="kill CMD after this many seconds",
)
@click.option(
    "--boot-timeout",
    type=click.FloatRange(min=0, min_open=True, max=10**5),
    default=60.0,
    callback=_not_nan,
    show_default=True,
    help="seconds the guest agent has to answer after boot",
)
@click.option(
    "--volume",
    "volumes",
    multiple=True,
    metavar="HOST_DIR:GUEST_PATH[:ro]",
    help="share a host directory over virtio-fs",
)
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def vm_run(
    rootfs_dir: Path,
    cpus: int,
    memory: int,
    backend: str,
    env: tuple[str, ...],
    workdir: str,
    timeout: float | None,
    boot_timeout: float,
    volumes: tuple[str, ...],
    cmd: tuple[str, ...],
) -> None:
    """Build a disk from --rootfs-dir (+ the agent), boot it, run CMD, stream its output, exit with its code.

    Example: microvm vm run --rootfs-dir ./rootfs --cpus 2 -- /bin/sh -c 'exit 3'
    """
    envd: dict[str, str] = {}
    for item in env:
        k, sep, v = item.partition("=")
        if not sep or not k or "\0" in item:
            raise click.BadParameter(f"{item!r} is not K=V", param_hint="--env")
        envd[k] = v
    if not workdir.startswith("/") or "\0" in workdir:
        raise click.BadParameter(f"{workdir!r} must be an absolute guest path", param_hint="--workdir")
    if not cmd[0]:
        raise click.BadParameter("CMD must not be empty", param_hint="CMD")
    if cmd[0].startswith("-"):
        raise click.NoSuchOption(cmd[0])
    shares = [_parse_volume(i, v) for i, v in enumerate(volumes)]
    _preflight(backend)
    code = run_command(
        rootfs_dir,
        list(cmd),
        cpus=cpus,
        memory=memory,
        backend=backend,
        env=envd,
        workdir=workdir,
        timeout=timeout,
        boot_timeout=boot_timeout,
        shares=shares,
    )
    sys.exit(code)


def _preflight(backend: str) -> None:
    """Everything cheap that can refuse the run, before the disk is built or a VM boots.

    A missing or forced-but-broken backend exits 125 (one line); a bad
    ``MICROVM_KERNEL`` is a usage error.
    """
    from microvm.backends import get_backend
    from microvm.kernel import find_kernel

    try:
        find_kernel()
    except MicrovmError as e:
        raise click.UsageError(str(e))
    try:
        get_backend(backend).check()
    except MicrovmError as e:
        click.echo(f"microvm: {type(e).__name__}: {_one_line(str(e))}", err=True)
        sys.exit(EXIT_VM)


def _parse_volume(i: int, spec: str) -> Share:
    parts = spec.split(":")
    ro = len(parts) == 3 and parts[2] == "ro"
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise click.BadParameter(
            f"{spec!r} is not HOST_DIR:GUEST_PATH[:ro|rw]", param_hint="--volume"
        )
    host, guest = Path(parts[0]), parts[1]
    if not host.is_dir():
        raise click.BadParameter(f"{parts[0]!r} is not a directory", param_hint="--volume")
    if not guest.startswith("/"):
        raise click.BadParameter(f"guest path {guest!r} must be absolute", param_hint="--volume")
    from microvm.backends.base import Share

    return Share(f"vol{i}", host, readonly=ro, guest_path=guest)


def run_command(
    rootfs_dir: Path,
    cmd: list[str],
    *,
    cpus: int = 1,
    memory: int = 512,
    backend: str = "qemu",
    env: dict[str, str] | None = None,
    workdir: str = "/",
    timeout: float | None = None,
    boot_timeout: float = 60.0,
    shares: Sequence[Share] = (),
) -> int:
    """What ``microvm vm run`` does; returns CMD's exit code (128+signal if killed by a signal).

    Example::

        run_command(Path("rootfs"), ["/bin/echo", "hi"])
    """
    from microvm._guestdisk import build_ext4
    from microvm._machine import Machine
    from microvm.agent import agent_binary
    from microvm.backends._rundir import owned_tempdir, remove_owned, sweep_stale

    sweep_stale()  # run dirs of `vm run`s that were SIGKILLed
    with _signals_unwind():
        tmp = owned_tempdir("microvm-run-")
        try:
            img = build_ext4(rootfs_dir, tmp / "root.img", agent=agent_binary())
            with Machine(
                backend,
                disks=[img],
                cpus=cpus,
                memory=memory,
                boot_timeout=boot_timeout,
                rundir=tmp / "run",
                shares=shares,
            ) as m:
                return _stream(m, cmd, env or {}, workdir, timeout)
        except MicrovmError as e:
            click.echo(f"microvm: {type(e).__name__}: {e}", err=True)
            return EXIT_VM
        except _Stopped as e:
            return 128 + e.signum
        except KeyboardInterrupt:
            return 130
        finally:
            remove_owned(tmp)
    raise AssertionError("unreachable")


class _Stopped(BaseException):
    """Raised in the main thread by SIGTERM/SIGHUP so ``with`` blocks and ``finally`` run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`_Stopped` while inside (main thread only).

    Only the first one raises; later ones are ignored so the cleanup it starts runs to the end.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGHUP)

    def handler(signum: int, frame: FrameType | None) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise _Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stream(
    m: Any, cmd: list[str], env: dict[str, str], workdir: str, timeout: float | None
) -> int:
    """Run ``cmd`` in the machine, copying its output to ours as it arrives.

    Ctrl-C sends SIGINT to the guest process group; a second Ctrl-C kills the machine (130).
    """
    proc = m.agent.exec_stream(cmd[0], cmd[1:], env=env, cwd=workdir, timeout=timeout, stdin=False)
    hits = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            raise KeyboardInterrupt
        with contextlib.suppress(Exception):
            proc.signal(signal.SIGINT)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        for ev in proc.events():
            if ev.kind == "stdout":
                sys.stdout.buffer.write(ev.data)
                sys.stdout.buffer.flush()
            elif ev.kind == "stderr":
                sys.stderr.buffer.write(ev.data)
                sys.stderr.buffer.flush()
            elif ev.kind == "exited":
                if ev.timed_out:
                    click.echo(f"microvm: {cmd[0]!r} timed out after {timeout}s; killed", err=True)
                if ev.signal:
                    return 128 + int(ev.signal)
                return int(ev.exit_code or 0)
    except KeyboardInterrupt:
        m.kill()
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    raise MicrovmError(f"agent connection ended before {cmd[0]!r} exited")


def _add_version(group: click.Group) -> None:
    """``--version`` on every command and subcommand (as on the group)."""
    for cmd in group.commands.values():
        if not any(p.name == "version" for p in cmd.params):
            click.version_option(package_name="microvm-sandbox", prog_name="microvm",
                                 message="%(prog)s %(version)s")(cmd)
        if isinstance(cmd, click.Group):
            _add_version(cmd)


_add_version(cli)


if __name__ == "__main__":
    main()
