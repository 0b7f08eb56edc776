"""Every docstring example in tls_proxy that can run here does run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import tempfile

import pytest

import tls_proxy

MODULES = ["tls_proxy"] + [f"tls_proxy.{m.name}" for m in pkgutil.iter_modules(tls_proxy.__path__)]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name, tmp_path, monkeypatch):
    # the examples mint CAs in tempfile.mkdtemp(): keep their private keys under tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, verbose=False)
    assert res.failed == 0
