"""Shared test helpers: skip reasons for missing root, binaries or a bootable VMM."""

from __future__ import annotations

import os
import shutil

import pytest


def require_root() -> None:
    """Skip the calling test unless it runs as root (namespaces, TAPs, mounts)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TAP devices or mounts)")


def require_binaries(*names: str) -> None:
    """Skip the calling test unless every named executable is on PATH (or an absolute path exists)."""
    missing = [n for n in names if not (shutil.which(n) or (os.path.isabs(n) and os.path.exists(n)))]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (install with ./setup.sh)")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
