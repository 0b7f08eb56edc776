"""``python -m rootfs``: pull, load, build, list, remove, prune, unpack and prepare images.

Example::

    python -m rootfs build /tmp/bb-root local/busybox:latest --cmd /bin/sh
    python -m rootfs pull 127.0.0.1:5000/busybox:latest --insecure
    python -m rootfs prepare local/busybox:latest --upper-size-mib 512
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import click

from rootfs._build import build_image
from rootfs._registry import RegistryAuth
from rootfs._store import ImageStore
from rootfs.errors import RegistryError, RootfsError


class RichProgress:
    """A ``progress`` callback for :meth:`ImageStore.pull` drawing one rich bar per layer.

    Example::

        with RichProgress() as bars:
            store.pull("alpine", progress=bars)
    """

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  DownloadColumn(), TransferSpeedColumn(),
                                  console=None, transient=False)
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._started = False

    def __enter__(self) -> RichProgress:
        return self  # the display starts with the first layer: no output before that

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._progress.stop()

    def __call__(self, digest: str, done: int, total: int) -> None:
        with self._lock:
            if not self._started:
                self._progress.start()
                self._started = True
            task = self._tasks.get(digest)
            if task is None:
                task = self._progress.add_task(digest[7:19], total=total or None)
                self._tasks[digest] = task
        self._progress.update(task, completed=done, total=total or None)


def _store(ctx: click.Context) -> ImageStore:
    return ImageStore(ctx.obj["home"])


@click.group(epilog="\b\nExample:\n  rootfs pull busybox:1.36 && rootfs list\n  rootfs --home /srv/images build ./root local/app:1 --cmd /bin/sh")
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="store directory (default $MICROVM_HOME/images)")
@click.pass_context
def main(ctx: click.Context, home: Path | None) -> None:
    """OCI images to guest root disks."""
    ctx.obj = {"home": home}


@main.command(epilog="\b\nExample:\n  rootfs pull busybox:1.36\n  rootfs pull 127.0.0.1:5000/app:1 --insecure --policy always")
@click.argument("ref")
@click.option("--insecure", is_flag=True, help="plain HTTP registry")
@click.option("--ca-certs", type=click.Path(exists=True), default=None, help="extra CA PEM")
@click.option("--username", default=None,
              help="registry user (password prompted for, or read with --password-stdin)")
@click.option("--password-stdin", is_flag=True, help="read the password from stdin")
@click.option("--policy", type=click.Choice(["if-missing", "always", "never"]),
              default="if-missing", show_default=True,
              help="if-missing: the stored image when there is one; always: ask the "
                   "registry; never: stored only")
@click.option("--platform", default=None, help="os/arch (default: this host)")
@click.pass_context
def pull(ctx: click.Context, ref: str, insecure: bool, ca_certs: str | None,
         username: str | None, password_stdin: bool, policy: str, platform: str | None) -> None:
    """Pull REF from its registry."""
    auth = None
    if username is not None:
        pw = sys.stdin.readline().rstrip("\n") if password_stdin else click.prompt(
            "password", hide_input=True)
        auth = RegistryAuth(username, pw)
    with RichProgress() as bars:
        img = _store(ctx).pull(ref, insecure=insecure, ca_certs=ca_certs, auth=auth,
                               policy=policy, progress=bars, platform=platform)  # type: ignore[arg-type]
    click.echo(f"{img.ref} {img.digest}")


@main.command(name="list", epilog="\b\nExample:\n  rootfs list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """List stored images."""
    for img in _store(ctx).list():
        size = sum(ly.size for ly in img.layers)
        click.echo(f"{img.ref}\t{img.digest[:19]}\t{img.platform}\t{size / 1e6:.1f} MB")


@main.command(epilog="\b\nExample:\n  rootfs rm busybox:1.36 && rootfs prune --grace 0")
@click.argument("ref")
@click.pass_context
def rm(ctx: click.Context, ref: str) -> None:
    """Untag REF (run prune to free space)."""
    _store(ctx).remove(ref)


@main.command(epilog="\b\nExample:\n  rootfs prune --grace 0")
@click.option("--grace", default=600.0, show_default=True,
              help="keep content younger than this many seconds")
@click.pass_context
def prune(ctx: click.Context, grace: float) -> None:
    """Free prepared roots whose owner is gone, then content no tag or prepared root uses."""
    r = _store(ctx).prune(grace_seconds=grace)
    click.echo(f"removed {r.prepared} prepared roots, {r.blobs} blobs, {r.trees} trees, "
               f"{r.disks} disks; freed {r.bytes_freed / 1e6:.1f} MB")


@main.command(epilog="\b\nExample:\n  rootfs unpack busybox:1.36 ./bb-root")
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
@click.pass_context
def unpack(ctx: click.Context, ref: str, dest: Path) -> None:
    """Flatten REF into the empty directory DEST."""
    _store(ctx).unpack(ref, dest)


@main.command(epilog="\b\nExample:\n  rootfs build ./root local/app:1 --cmd /bin/echo --cmd hi --env PATH=/bin")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("ref")
@click.option("--cmd", multiple=True, help="Cmd entry (repeat for arguments)")
@click.option("--env", multiple=True, help="KEY=VALUE in the image config (repeatable)")
@click.pass_context
def build(ctx: click.Context, src: Path, ref: str, cmd: tuple[str, ...],
          env: tuple[str, ...]) -> None:
    """Build a one-layer image of SRC tagged REF."""
    config: dict[str, Any] = {}
    if cmd:
        config["Cmd"] = list(cmd)
    if env:
        config["Env"] = list(env)
    img = build_image(src, ref, _store(ctx), config=config)
    click.echo(f"{img.ref} {img.digest}")


@main.command(epilog="\b\nExample:\n  rootfs load app.tar --ref local/app:1")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--ref", default=None, help="tag for the (single) image")
@click.pass_context
def load(ctx: click.Context, path: Path, ref: str | None) -> None:
    """Import an OCI layout (dir/tar) or a docker save archive."""
    for img in _store(ctx).load(path, ref):
        click.echo(f"{img.ref} {img.digest}")


@main.command(epilog="\b\nExample:\n  rootfs save local/app:1 app.tar")
@click.argument("refs", nargs=-1, required=True)
@click.argument("dest", type=click.Path(path_type=Path))
@click.pass_context
def save(ctx: click.Context, refs: tuple[str, ...], dest: Path) -> None:
    """Export REFS as an OCI layout at DEST (a tarball if DEST ends in .tar)."""
    click.echo(str(_store(ctx).save(list(refs), dest)))


@main.command(epilog="\b\nExample:\n  rootfs prepare busybox:1.36 --upper-size-mib 512 --dest ./sb1")
@click.argument("ref")
@click.option("--upper-size-mib", default=4096, show_default=True,
              help="size of the writable upper disk in MiB")
@click.option("--format", "fmt", type=click.Choice(["erofs", "ext4"]), default="erofs",
              show_default=True, help="file system of the read-only lower disk")
@click.option("--dest", type=click.Path(path_type=Path), default=None,
              help="per-sandbox directory for the upper disk; the prepared root lives "
                   "until DEST is removed (without it, the next prune frees it)")
@click.pass_context
def prepare(ctx: click.Context, ref: str, upper_size_mib: int, fmt: str,
            dest: Path | None) -> None:
    """Build the disks for REF and print the guest mount plan (JSON)."""
    root = _store(ctx).prepare(ref, upper_size_mib=upper_size_mib,
                               image_format=fmt, dest=dest)  # type: ignore[arg-type]
    click.echo(json.dumps(root.mount_plan()))


def run() -> None:
    """Entry point: errors become one line on stderr and exit status 1 (no traceback).

    Registry hints name the command's options (``--insecure``), not API arguments.
    """
    try:
        main(standalone_mode=True)
    except RegistryError as exc:
        click.echo(f"error: {exc.cli_message}", err=True)
        sys.exit(1)
    except RootfsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # a path the store did not wrap: still one line
        where = f" {exc.filename!r}" if exc.filename else ""
        click.echo(f"error:{where} {exc.strerror or exc}", err=True)
        sys.exit(1)
