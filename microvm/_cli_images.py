"""``microvm pull | images | rmi | image ... | volume ... | system df|prune``.

Images are ``rootfs``'s: these commands are the ``rootfs`` command's own (same code,
same rich per-layer progress bars) mounted under ``microvm`` with docker's names; errors
become one line and exit 125. Volumes are the named volumes of
``$MICROVM_HOME/volumes``; ``system prune`` frees prepared roots nobody uses any more
and the image content no tag needs.

Example::

    microvm pull busybox:1.36
    microvm images
    microvm image build ./root local/app:1
    microvm system df
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import click

from microvm._cli_util import Failure, guarded

__all__ = ["register"]


def _alias(cmd: click.Command, name: str, example: str) -> click.Command:
    """``cmd`` of ``rootfs`` under another name, its store the default one."""
    inner = cmd.callback
    assert inner is not None

    @guarded
    def callback(**kw: Any) -> Any:
        ctx = click.get_current_context()
        ctx.obj = {"home": None}
        return ctx.invoke(inner, **kw)

    help_text = (cmd.help or "").rstrip() + f"\n\n\b\nExample:\n  {example}"
    return click.Command(name, params=list(cmd.params), callback=callback, help=help_text)


def _du(path: Path) -> int:
    total = 0
    if not path.exists():
        return 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_blocks * 512
        except OSError:
            continue
    return total


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


@click.group("volume")
def volume_group() -> None:
    """Named volumes (``-v NAME:/path``); they outlive sandboxes.

    \b
    Example:
      microvm volume ls
    """


def _volumes_in_use() -> set[str]:
    from microvm import Sandbox

    used: set[str] = set()
    for info in Sandbox.list():
        for v in info.config.volumes:
            if v.named:
                used.add(v.named)
    return used


@volume_group.command("ls")
@guarded
def volume_ls() -> None:
    """List named volumes, their size and whether a sandbox uses them.

    \b
    Example:
      microvm volume ls
    """
    from microvm.sandbox._paths import volumes_root

    root = volumes_root()
    used = _volumes_in_use()
    click.echo("NAME\tSIZE\tUSED")
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        click.echo(f"{d.name}\t{_mib(_du(d))}\t{'yes' if d.name in used else 'no'}")


@volume_group.command("rm")
@click.argument("names", nargs=-1, required=True)
@guarded
def volume_rm(names: tuple[str, ...]) -> None:
    """Delete named volumes no sandbox uses.

    \b
    Example:
      microvm volume rm cache
    """
    from microvm.sandbox._paths import volumes_root

    used = _volumes_in_use()
    for n in names:
        d = volumes_root() / n
        if "/" in n or n in ("", ".", "..") or not d.is_dir():
            raise Failure(f"no volume named {n!r}")
        if n in used:
            raise Failure(f"volume {n!r} is used by a sandbox: remove the sandbox first")
        shutil.rmtree(d)
        click.echo(n)


@volume_group.command("prune")
@guarded
def volume_prune() -> None:
    """Delete every named volume no sandbox uses.

    \b
    Example:
      microvm volume prune
    """
    from microvm.sandbox._paths import volumes_root

    root = volumes_root()
    used = _volumes_in_use()
    freed = 0
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.name not in used:
            freed += _du(d)
            shutil.rmtree(d)
            click.echo(d.name)
    click.echo(f"freed {_mib(freed)}")


@click.group("system")
def system_group() -> None:
    """Disk use of images, sandboxes and volumes; pruning.

    \b
    Example:
      microvm system df
    """


@system_group.command("df")
@guarded
def system_df() -> None:
    """Space used under $MICROVM_HOME by images, sandboxes and volumes.

    \b
    Example:
      microvm system df
    """
    from microvm.sandbox._paths import sandboxes_root, volumes_root
    from rootfs import ImageStore

    store = ImageStore()
    rows = [("images", len(store.list()), _du(store.home)),
            ("sandboxes", len(list(sandboxes_root().iterdir())) if sandboxes_root().is_dir()
             else 0, _du(sandboxes_root())),
            ("volumes", len(list(volumes_root().iterdir())) if volumes_root().is_dir() else 0,
             _du(volumes_root()))]
    click.echo("TYPE\tCOUNT\tSIZE")
    for kind, n, size in rows:
        click.echo(f"{kind}\t{n}\t{_mib(size)}")


@system_group.command("prune")
@click.option("--grace", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="keep content younger than this many seconds")
@guarded
def system_prune(grace: float) -> None:
    """Free prepared root disks nobody uses any more and image content no tag needs
    (sandboxes and named volumes are kept: remove them with rm / volume prune).

    \b
    Example:
      microvm system prune --grace 0
    """
    from rootfs import ImageStore

    r = ImageStore().prune(grace_seconds=grace)
    click.echo(f"prepared roots {r.prepared}, blobs {r.blobs}, trees {r.trees}, "
               f"disks {r.disks}: freed {_mib(r.bytes_freed)}")


def register(group: click.Group) -> None:
    """Add the image, volume and system commands to the ``microvm`` group.

    Example::

        register(cli)
    """
    from rootfs import cli as rcli

    image = click.Group("image", help="Images (the rootfs store).\n\n\b\nExample:\n"
                        "  microvm image ls")
    table = [("pull", rcli.pull, "microvm image pull busybox:1.36"),
             ("ls", rcli.list_, "microvm image ls"),
             ("rm", rcli.rm, "microvm image rm busybox:1.36"),
             ("build", rcli.build, "microvm image build ./root local/app:1"),
             ("load", rcli.load, "microvm image load app.tar"),
             ("save", rcli.save, "microvm image save local/app:1 app.tar"),
             ("prune", rcli.prune, "microvm image prune --grace 0")]
    for name, cmd, example in table:
        image.add_command(_alias(cmd, name, example))
    group.add_command(image)
    group.add_command(_alias(rcli.pull, "pull", "microvm pull busybox:1.36"))
    group.add_command(_alias(rcli.list_, "images", "microvm images"))
    group.add_command(_alias(rcli.rm, "rmi", "microvm rmi busybox:1.36"))
    group.add_command(volume_group)
    group.add_command(system_group)
