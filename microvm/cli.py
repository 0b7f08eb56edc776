"""The ``microvm`` command: ``microvm kernel fetch|path`` and ``microvm vm run``.

Example::

    microvm kernel fetch --dest vendor
    microvm vm run --rootfs-dir ./rootfs --cpus 2 --memory 512 -- /bin/sh -c 'echo hi'
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from microvm.backends.base import Share
from microvm.errors import MicrovmError

__all__ = ["main"]


@click.group()
def main() -> None:
    """Boot microVMs and run commands in them.

    \b
    Example:
        microvm kernel fetch
        microvm vm run --rootfs-dir ./rootfs -- /bin/sh -c 'echo hi'
    """


@main.group()
def kernel() -> None:
    """The guest kernel (libkrunfw).

    Example: microvm kernel fetch --dest vendor
    """


@kernel.command("fetch")
@click.option(
    "--dest",
    type=click.Path(path_type=Path),
    default=None,
    help="target directory (default $MICROVM_HOME/kernel)",
)
@click.option("--source", type=click.Choice(["auto", "system", "debian", "wheel"]), default="auto")
@click.option("--force", is_flag=True, help="fetch again even if present")
def kernel_fetch(dest: Path | None, source: str, force: bool) -> None:
    """Fetch libkrunfw (pinned sha256) and write the PVH ELF QEMU boots.

    Example: microvm kernel fetch --source debian --dest vendor
    """
    from microvm.kernel import fetch_kernel

    try:
        k = fetch_kernel(dest, source=source, force=force)
    except MicrovmError as e:
        raise click.ClickException(str(e))
    click.echo(f"kernel: {k.elf} (from {k.source}: {k.library})")


@kernel.command("path")
def kernel_path() -> None:
    """Print the path of the kernel ELF (exit 1 if not fetched).

    Example: qemu-system-x86_64 -kernel "$(microvm kernel path)" ...
    """
    from microvm.kernel import find_kernel

    k = find_kernel()
    if k is None:
        raise click.ClickException("no kernel: run `microvm kernel fetch`")
    click.echo(str(k.elf))


@main.group()
def vm() -> None:
    """Low-level machines (see microvm.Machine).

    Example: microvm vm run --rootfs-dir ./rootfs -- /bin/true
    """


@vm.command("run", context_settings={"ignore_unknown_options": True})
@click.option(
    "--rootfs-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="directory that becomes the guest's root (copied into a disk)",
)
@click.option("--cpus", type=click.IntRange(1, 32), default=1, show_default=True)
@click.option(
    "--memory",
    type=click.IntRange(64, 65536),
    default=512,
    show_default=True,
    help="guest RAM in MiB",
)
@click.option(
    "--backend", type=click.Choice(["qemu", "libkrun"]), default="qemu", show_default=True
)
@click.option("--env", "env", multiple=True, metavar="K=V", help="environment for CMD")
@click.option("--workdir", default="/", show_default=True, help="working directory of CMD")
@click.option("--timeout", type=float, default=None, help="kill CMD after this many seconds")
@click.option("--boot-timeout", type=float, default=60.0, show_default=True)
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
        if not sep or not k:
            raise click.BadParameter(f"{item!r} is not K=V", param_hint="--env")
        envd[k] = v
    shares = [_parse_volume(i, v) for i, v in enumerate(volumes)]
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
    from microvm.agent import agent_binary
    from microvm.guestdisk import build_ext4
    from microvm.machine import Machine

    with tempfile.TemporaryDirectory(prefix="microvm-run-") as tmp:
        try:
            img = build_ext4(rootfs_dir, Path(tmp) / "root.img", agent=agent_binary())
            with Machine(
                backend,
                disks=[img],
                cpus=cpus,
                memory=memory,
                boot_timeout=boot_timeout,
                rundir=Path(tmp) / "run",
                shares=shares,
            ) as m:
                return _stream(m, cmd, env or {}, workdir, timeout)
        except MicrovmError as e:
            click.echo(f"microvm: {type(e).__name__}: {e}", err=True)
            return 125


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


if __name__ == "__main__":
    main()
