"""The examples in the fast-path modules' docstrings run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["netstack.classifier", "netstack.hello", "netstack.pincache", "netstack.frameinfo",
           "netstack.dnsparse", "netstack.verdict", "netstack._ipbytes"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
