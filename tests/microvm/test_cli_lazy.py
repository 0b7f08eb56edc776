"""The ``microvm`` group imports a command's module only when that command runs.

No guest needed: the table in ``microvm.cli`` must name exactly the commands the modules
register, ``--help`` must still list them all (each with ``--version``), and ``run``,
``exec`` or ``--version`` must not import the other command modules.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click

COMMAND_MODULES = ("microvm._cli_sandbox", "microvm._cli_manage", "microvm._cli_images",
                   "microvm._cli_doctor", "microvm.ssh._cli", "microvm.fleet._cli", "rootfs.cli")


def _loaded_after(code: str) -> list[str]:
    """The command modules imported by a fresh interpreter after running ``code``."""
    probe = (f"import sys, json\n{code}\n"
             f"print(json.dumps([m for m in {COMMAND_MODULES!r} if m in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout.strip().splitlines()[-1]))


def test_the_table_names_exactly_what_the_modules_register() -> None:
    from microvm import cli as climod

    for source in dict.fromkeys(climod._LAZY_SOURCES.values()):
        g = climod.LazyGroup("probe")
        g._load(source)
        declared = {n for n, s in climod._LAZY_SOURCES.items() if s == source}
        assert set(g.commands) == declared, source
    names = climod.cli.list_commands(click.Context(climod.cli))
    assert set(names) == set(climod._LAZY_SOURCES) | {"kernel", "vm"}
    for n in names:
        cmd = climod.cli.commands[n]
        assert any(p.name == "version" for p in cmd.params), n


def test_a_command_imports_only_its_own_module() -> None:
    run = "from microvm.cli import cli; import click; cli.get_command(click.Context(cli), 'run')"
    assert _loaded_after(run) == ["microvm._cli_sandbox"]
    ls = "from microvm.cli import cli; import click; cli.get_command(click.Context(cli), 'ps')"
    assert _loaded_after(ls) == ["microvm._cli_manage"]
    assert _loaded_after("import microvm.cli") == []


def test_version_and_help_through_the_real_command() -> None:
    base = [sys.executable, "-m", "microvm"]
    version = subprocess.run([*base, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("microvm ")
    for argv in (["ps", "--version"], ["image", "ls", "--version"], ["doctor", "--version"],
                 ["ssh", "--version"]):
        r = subprocess.run([*base, *argv], capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stdout) == (0, version.stdout), (argv, r.stderr)
    h = subprocess.run([*base, "--help"], capture_output=True, text=True, timeout=120)
    listed = {ln.split()[0] for ln in h.stdout.split("Commands:", 1)[1].splitlines()
              if ln.startswith("  ")}
    assert {"run", "exec", "ps", "images", "doctor", "fleet", "volume"} <= listed
    bad = subprocess.run([*base, "nosuchcmd"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
