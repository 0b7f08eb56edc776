"""The README's quick start runs as written, from a fresh directory, twice in a row.

Every ``python`` and ``sh`` block of the "Quick start" section runs in order (Python
blocks with this interpreter, shell blocks with bash and this environment's ``bin/`` first
on ``PATH``, as after ``. .venv/bin/activate``), in a temporary working directory with its
own ``MICROVM_HOME``; then the whole sequence runs again. A block that fails shows its
output.
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


def quick_start_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("## Quick start"):text.index("## The layers")]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(python|sh)\n(.*?)```",
                                                          section, re.S)]


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
