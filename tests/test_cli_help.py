"""The ``rootfs`` and ``tls_proxy`` console scripts: help on every flag, an example in each
``--help`` (the ``microvm`` command's own help is checked in ``tests/microvm``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest


def _script(name: str) -> str:
    """The installed console script (beside this interpreter, or on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        pytest.skip(f"console script {name!r} is not installed (pip install -e .)")
    return found


def test_rootfs_every_command_has_an_example_and_every_flag_help() -> None:
    from rootfs.cli import main

    commands: list[tuple[str, click.Command]] = [("rootfs", main)]
    commands += [(f"rootfs {n}", c) for n, c in main.commands.items()]
    for path, cmd in commands:
        assert cmd.epilog and "Example:" in cmd.epilog and "rootfs " in cmd.epilog, path
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.help, f"{path} {p.opts[0]} has no help"


def test_rootfs_console_script_help_shows_the_example() -> None:
    for argv in ([], ["pull"], ["build"]):
        r = subprocess.run([_script("rootfs"), *argv, "--help"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "Example:" in r.stdout and "\n    rootfs " in r.stdout, argv


def test_tls_proxy_console_script_help() -> None:
    r = subprocess.run([_script("tls_proxy"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: tls_proxy ")
    assert "example:\n  tls_proxy --listen 127.0.0.1:8080" in r.stdout
    from tls_proxy.__main__ import build_parser

    for action in build_parser()._actions:
        assert action.help, f"tls_proxy {action.option_strings} has no help"
    r = subprocess.run([sys.executable, "-m", "tls_proxy", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m tls_proxy ")
