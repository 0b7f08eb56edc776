"""Mount a PreparedRoot on the host the way the guest agent does (loop + overlay)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def _loop(image: str, readonly: bool) -> Iterator[str]:
    argv = ["losetup", "--find", "--show"] + (["--read-only"] if readonly else []) + [image]
    dev = _run(*argv)
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextmanager
def _mount(source: str, target: Path, fstype: str, options: str) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", fstype, "-o", options, source, str(target))
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


@contextmanager
def mount_plan(plan: dict[str, Any], where: Path) -> Iterator[Path]:
    """Mount a plan's disks under ``where`` and yield the merged root."""
    with ExitStack() as stack:
        if plan["kind"] == "disk":
            dev = stack.enter_context(_loop(plan["root"]["disk"], False))
            yield stack.enter_context(_mount(dev, where / "root", plan["root"]["fstype"], "rw"))
            return
        lowers = []
        for i, low in enumerate(plan["lower"]):
            dev = stack.enter_context(_loop(low["disk"], True))
            lowers.append(stack.enter_context(_mount(dev, where / f"lower{i}", low["fstype"],
                                                     "ro")))
        up = plan["upper"]
        dev = stack.enter_context(_loop(up["disk"], False))
        upper = stack.enter_context(_mount(dev, where / "upperdisk", up["fstype"], "rw"))
        opts = "lowerdir={},upperdir={},workdir={}".format(
            ":".join(str(p) for p in lowers),
            upper / up["upperdir"].lstrip("/"),
            upper / up["workdir"].lstrip("/"),
        )
        yield stack.enter_context(_mount("overlay", where / "merged", "overlay", opts))
