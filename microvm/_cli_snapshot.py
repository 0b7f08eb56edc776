"""``microvm snapshot create|ls|rm|restore|export|import``, ``microvm fork``, ``pause``, ``resume``:
the command line of :mod:`microvm.sandbox._snapshots` (QEMU sandboxes).

Forks made here are detached (they outlive the command, like ``run -d``); stop and
remove them with ``microvm stop`` / ``microvm rm``. Exit status: 0, or 125 when a
snapshot, fork, pause or resume failed (one line on stderr each), 2 for a bad command
line.

Example::

    microvm snapshot create web warm
    microvm fork web -n 3
    microvm snapshot restore warm --name w1
    microvm snapshot export warm /tmp/warm.tar.zst
    microvm pause web && microvm resume web
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import click

from microvm._cli_util import (
    for_each,
    for_each_sandbox,
    guarded,
    prestart_supervisor,
    supervisor_ready,
)

__all__ = ["fork_cmd", "pause_cmd", "register", "resume_cmd", "snapshot_group"]


def _size(n: int) -> str:
    """Bytes for humans: ``512B``, ``1.5MiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"


@click.group("snapshot")
def snapshot_group() -> None:
    """Save, list, remove, export and import sandbox snapshots.

    \b
    Example:
      microvm snapshot create web warm
      microvm snapshot ls
    """


@snapshot_group.command("create")
@click.option("--no-checksums", is_flag=True, help="skip the memory/disk sha256 (faster)")
@click.option("--disk-only", is_flag=True,
              help="the upper disk and the pinned image only, no memory (restores boot cold)")
@click.argument("sandbox")
@click.argument("name")
@guarded
def snapshot_create(sandbox: str, name: str, no_checksums: bool, disk_only: bool) -> None:
    """Save running SANDBOX as snapshot NAME (RAM, devices, its disk).

    \b
    Example:
      microvm snapshot create web warm
      microvm snapshot create --disk-only web after-setup
    """
    from microvm import Sandbox
    from microvm.sandbox._snapshots import snapshot_target

    snapshot_target(name)   # a bad or taken name fails before the sandbox pauses
    sb = Sandbox.get(sandbox)
    try:
        info = sb.snapshot(name, checksums=not no_checksums, disk_only=disk_only)
    finally:
        sb.close()
    click.echo(info.name)


@snapshot_group.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="names only")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="json: one JSON array")
@guarded
def snapshot_ls(quiet: bool, fmt: str) -> None:
    """List the snapshots under $MICROVM_HOME/snapshots, oldest first.

    \b
    Example:
      microvm snapshot ls --format json
    """
    from microvm.sandbox._snapshots import list_snapshots

    snaps = list_snapshots()
    if quiet:
        for s in snaps:
            click.echo(s.name)
        return
    rows = [{"name": s.name, "source": s.source, "image": s.image, "size": s.size,
             "memory_mib": s.memory_mib, "created": s.created} for s in snaps]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    table = [("NAME", "SOURCE", "IMAGE", "MEMORY", "SIZE", "CREATED")]
    table += [(s.name, s.source, s.image, f"{s.memory_mib}MiB", _size(s.size),
               _dt.datetime.fromtimestamp(s.created).strftime("%Y-%m-%d %H:%M:%S"))
              for s in snaps]
    widths = [max(len(t[c]) for t in table) for c in range(len(table[0]))]
    for t in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip())


@snapshot_group.command("rm")
@click.argument("names", nargs=-1, required=True)
def snapshot_rm(names: tuple[str, ...]) -> None:
    """Delete snapshots (sandboxes restored from them keep running).

    \b
    Example:
      microvm snapshot rm warm
    """
    from microvm.sandbox._snapshots import remove_snapshot

    for_each(names, "snapshot rm", remove_snapshot)


@snapshot_group.command("export")
@click.argument("name")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@guarded
def snapshot_export(name: str, archive: Path) -> None:
    """Write snapshot NAME as one tar+zstd ARCHIVE.

    \b
    Example:
      microvm snapshot export warm /tmp/warm.tar.zst
    """
    from microvm.sandbox._snapshots import export_snapshot

    click.echo(str(export_snapshot(name, archive)))


@snapshot_group.command("import")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("name")
@guarded
def snapshot_import(archive: Path, name: str) -> None:
    """Unpack ARCHIVE as snapshot NAME, verified in full before it is kept.

    \b
    Example:
      microvm snapshot import /tmp/warm.tar.zst warm2
    """
    from microvm.sandbox._snapshots import import_snapshot

    click.echo(import_snapshot(archive, name).name)


@snapshot_group.command("restore")
@click.option("--name", default=None, help="the new sandbox's name (default SNAPSHOT-K)")
@click.argument("snapshot")
@guarded
def snapshot_restore(snapshot: str, name: str | None) -> None:
    """Start a new detached sandbox from SNAPSHOT; prints its name.

    \b
    Example:
      microvm snapshot restore warm --name w1
    """
    prestart_supervisor()       # its imports overlap ours
    from microvm import Sandbox
    from microvm.sandbox._config import validate_name
    from microvm.sandbox._snapshots import resolve
    from microvm.sandbox._state import StateDB

    path = resolve(snapshot)   # a bad name fails here
    if name is None:
        taken = {i.name for i in StateDB().list()}
        name = next(f"{path.name}-{k}" for k in range(1, 10_000)
                    if f"{path.name}-{k}" not in taken)
    validate_name(name)
    supervisor_ready()
    sb = Sandbox.restore(snapshot, name=name, detached=True)
    click.echo(sb.name)
    sb.close()


@click.command("fork")
@click.option("-n", "--count", type=click.IntRange(1, 64), default=1, show_default=True,
              help="how many forks")
@click.option("--name", "names", multiple=True,
              help="name of a fork (repeat once per fork; default SANDBOX-fork-K)")
@click.argument("sandbox")
@guarded
def fork_cmd(sandbox: str, count: int, names: tuple[str, ...]) -> None:
    """Copy running SANDBOX into COUNT new detached sandboxes; prints their names.

    \b
    Example:
      microvm fork web -n 3
      microvm fork web --name web-a --name web-b
    """
    if names and len(names) != count and count != 1:
        raise click.BadParameter(f"{len(names)} --name for -n {count}: give one per fork",
                                 param_hint="--name")
    n = len(names) or count
    prestart_supervisor()       # its imports overlap ours
    from microvm import Sandbox

    sb = Sandbox.get(sandbox)
    try:
        supervisor_ready()
        forks = sb.fork_many(n, names=list(names) or None, detached=True)
    finally:
        sb.close()
    for f in forks:
        click.echo(f.name)
        f.close()


@click.command("pause")
@click.argument("names", nargs=-1, required=True)
def pause_cmd(names: tuple[str, ...]) -> None:
    """Freeze running sandboxes' guests (network and timers stay up).

    \b
    Example:
      microvm pause web
    """
    for_each_sandbox(names, "pause", lambda sb: sb.pause())


@click.command("resume")
@click.argument("names", nargs=-1, required=True)
def resume_cmd(names: tuple[str, ...]) -> None:
    """Run paused guests again (their clock is stepped to the host's).

    \b
    Example:
      microvm resume web
    """
    for_each_sandbox(names, "resume", lambda sb: sb.resume())


def register(group: click.Group) -> None:
    """Add ``snapshot``, ``fork``, ``pause`` and ``resume`` to the ``microvm`` group.

    Example::

        register(cli)
    """
    for c in (snapshot_group, fork_cmd, pause_cmd, resume_cmd):
        group.add_command(c)
