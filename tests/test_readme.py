"""The README's quick start runs as written, from a fresh directory, twice in a row; so do
the runnable examples of "The microvm command".

Every ``python`` and ``sh`` block of the "Quick start" section runs in order (Python
blocks with this interpreter, shell blocks with bash and this environment's ``bin/`` first
on ``PATH``, as after ``. .venv/bin/activate``), in a temporary working directory with its
own ``MICROVM_HOME``; then the whole sequence runs again. A block that fails shows its
output.

The ``sh`` blocks of "The microvm command" run once the same way, under ``bash -e -o
pipefail``; each of their ``# text`` comment lines (a whole line) is output that must
appear as a line of stdout or stderr. Its ``console`` blocks are illustrative (the README
says so) and not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


def section_blocks(heading: str) -> list[tuple[str, str]]:
    """The ``python`` and ``sh`` blocks of the README section that starts with ``heading``."""
    text = README.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    section = text[start:end if end >= 0 else len(text)]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(python|sh)\n(.*?)```",
                                                          section, re.S)]


def quick_start_blocks() -> list[tuple[str, str]]:
    return section_blocks("## Quick start")


def test_quick_start_has_examples() -> None:
    kinds = [k for k, _ in quick_start_blocks()]
    assert kinds.count("python") >= 2 and kinds.count("sh") >= 2


@pytest.mark.skipif(os.geteuid() != 0, reason="the quick start's sandboxes need root (TAP uplink)")
def test_quick_start_runs_twice(tmp_path: Path) -> None:
    env = dict(os.environ, MICROVM_HOME=str(tmp_path / "home"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    blocks = quick_start_blocks()
    cleanups = [code for lang, code in blocks if lang == "sh" and "kill " in code]
    try:
        for round_ in (1, 2):
            for i, (lang, code) in enumerate(blocks):
                argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-c", code]
                r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=300)
                assert r.returncode == 0, (f"round {round_}, block {i} ({lang}) failed "
                                           f"({r.returncode}):\n{code}\n--- stdout\n{r.stdout}"
                                           f"\n--- stderr\n{r.stderr}")
                if lang == "python" and "secret" in code:
                    assert "upstream saw: Bearer sk-real" in r.stdout
                    assert "secret_policy_denied" in r.stdout
                    assert "$MSB_API_KEY" in r.stdout
    finally:   # the HTTPS test server the README starts must not outlive a failed run
        for code in cleanups:
            subprocess.run(["bash", "-c", code], cwd=tmp_path, env=env, timeout=60)


def test_microvm_command_section_has_runnable_examples() -> None:
    blocks = section_blocks("## The microvm command")
    assert [k for k, _ in blocks] == ["sh"]
    code = blocks[0][1]
    assert code.count("\nmicrovm ") >= 8 and "\n# " in code


@pytest.mark.skipif(os.geteuid() != 0, reason="the published port needs root (TAP uplink)")
def test_microvm_command_examples_run(tmp_path: Path) -> None:
    env = dict(os.environ, MICROVM_HOME=str(tmp_path / "home"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        for i, (_, code) in enumerate(section_blocks("## The microvm command")):
            r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=300)
            shown = f"block {i}:\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
            assert r.returncode == 0, f"exit {r.returncode}, " + shown
            lines = set(r.stdout.splitlines()) | set(r.stderr.splitlines())
            for ln in code.splitlines():
                if ln.startswith("# "):
                    assert ln[2:] in lines, f"{ln[2:]!r} not printed by " + shown
            assert "Traceback" not in r.stderr, shown
    finally:   # a failed block must not leave its sandbox running
        subprocess.run([sys.executable, "-m", "microvm", "rm", "-f", "web"], env=env,
                       capture_output=True, timeout=120)
