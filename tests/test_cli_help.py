"""Every command of the project is a click command: help on every flag, an example in each
``--help`` (the ``microvm`` command's own help is checked further in ``tests/microvm``),
and a bad flag is one line on stderr with exit status 2, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
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


def _walk(path: str, cmd: click.Command) -> Iterator[tuple[str, click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"{path} {name}"
            yield from _walk(f"{path} {name}", sub)


def _commands() -> list[tuple[str, click.Command]]:
    from microvm.cli import cli as microvm_cli
    from netstack.serve import cli as netstack_cli
    from rootfs.cli import main as rootfs_cli
    from tls_proxy.__main__ import cli as tls_proxy_cli

    kernel = microvm_cli.get_command(click.Context(microvm_cli), "kernel")
    assert kernel is not None
    return [*_walk("rootfs", rootfs_cli), *_walk("tls_proxy", tls_proxy_cli),
            *_walk("python -m netstack", netstack_cli), *_walk("microvm kernel", kernel)]


def test_every_command_has_an_example_and_every_flag_help() -> None:
    for path, cmd in _commands():
        text = f"{cmd.help or ''}\n{cmd.epilog or ''}"
        assert "Example:" in text, f"{path}: no example in its --help"
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
    assert r.stdout.startswith("Usage: tls_proxy ")
    assert "Example:\n    tls_proxy --listen 127.0.0.1:8080" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tls_proxy", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("Usage: python -m tls_proxy ")


@pytest.mark.parametrize("argv", [
    [sys.executable, "-m", "tls_proxy", "--listen", "127.0.0.1:0", "--bogus"],
    [sys.executable, "-m", "netstack", "serve", "--socket", "s.sock", "--bogus"],
    [sys.executable, "-m", "netstack", "serve", "--socket", "s.sock", "--policy", "p.json",
     "--mtu", "big"],
    [sys.executable, "-m", "microvm.kernel", "fetch", "--bogus"],
    [sys.executable, "-m", "microvm.kernel", "fetch", "--source", "ftp"],
])
def test_bad_flag_is_one_line_and_exit_2(argv: list[str], tmp_path: Path) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--help" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []   # nothing started, nothing written


def test_python_m_microvm_kernel_is_microvm_kernel() -> None:
    r = subprocess.run([sys.executable, "-m", "microvm.kernel", "fetch", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--source" in r.stdout and "Example:" in r.stdout, r.stderr
