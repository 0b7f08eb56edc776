"""The ``>>>`` examples of the sandbox modules run (pure ones: no guest, no root)."""

from __future__ import annotations

import doctest
import importlib
import tempfile
from pathlib import Path

import pytest

MODULES = ["microvm.sandbox.config", "microvm.sandbox.state", "microvm.sandbox.paths",
           "microvm.sandbox.exec", "microvm.sandbox.launch", "microvm.sandbox.netwiring"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROVM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # the examples' mkdtemp()
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0 or name.endswith("netwiring")
