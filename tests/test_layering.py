"""The layering rule holds: ``rootfs``, ``netstack`` and ``tls_proxy`` never import each
other or ``microvm`` (pyproject.toml's ``[tool.importlinter]`` contracts, checked by
``lint-imports``: every import counts, inside functions and under ``TYPE_CHECKING`` too).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_leaves_import_neither_each_other_nor_microvm(tmp_path: Path) -> None:
    r = lint_imports(tmp_path, ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout, r.stdout


def test_the_contracts_catch_a_leaf_importing_upward_or_sideways(tmp_path: Path) -> None:
    """The same contracts over a fake tree that breaks both rules report both."""
    for pkg, body in [("rootfs", "def f() -> None:\n    import microvm\n"),
                      ("netstack", "from tls_proxy import x\n"),
                      ("tls_proxy", "x = 1\n"), ("microvm", "import rootfs\n")]:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(body)
    r = lint_imports(tmp_path, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "0 kept, 2 broken" in r.stdout, r.stdout
    assert "rootfs -> microvm" in r.stdout and "netstack -> tls_proxy" in r.stdout, r.stdout
