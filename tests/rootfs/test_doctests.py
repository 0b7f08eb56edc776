"""The ``>>>`` examples in rootfs docstrings run and hold."""

from __future__ import annotations

import doctest

import pytest

import rootfs.image
import rootfs.patches
import rootfs.reference
import rootfs.registry


@pytest.mark.parametrize("module", [rootfs.reference, rootfs.registry, rootfs.image, rootfs.patches])
def test_doctests(module: object) -> None:
    result = doctest.testmod(module, verbose=False)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0
