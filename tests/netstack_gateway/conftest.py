"""Fixtures shared by the gateway tests: a private $MICROVM_HOME per test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MICROVM_HOME (slot locks and uplink records go there)."""
    h = tmp_path / "mvhome"
    h.mkdir()
    monkeypatch.setenv("MICROVM_HOME", str(h))
    return h
