"""The examples in the policy model's docstrings run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["netstack", "netstack.addresses", "netstack.names", "netstack.destination",
           "netstack.rule", "netstack.flow", "netstack.policy"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
