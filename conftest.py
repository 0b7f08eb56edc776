"""Pytest configuration for the docstring examples of the four packages.

``pyproject.toml`` runs pytest with ``--doctest-modules`` over ``rootfs``, ``netstack``,
``tls_proxy`` and ``microvm`` as well as ``tests``: every ``>>>`` example is a test item.
Each example runs in a fresh temporary directory (:func:`doctest_sandbox`): the current
directory, ``MICROVM_HOME`` and :func:`tempfile.mkdtemp` all point under pytest's
``tmp_path``, so examples that mint CA keys or build images leave nothing in ``/tmp``;
the environment variables an example sets are restored after it.

The CI skip rule of ``tests/conftest.py`` (a skip under ``CI=true`` is a failure unless
allow-listed) applies to the doctest items too: the hooks below hand the package items
to it (``tests/conftest.py`` handles the items under ``tests/`` itself).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

from tests import conftest as suite

TESTS = Path(__file__).resolve().parent / "tests"


def _in_packages(path: Path) -> bool:
    return not path.resolve().is_relative_to(TESTS)


@pytest.fixture(autouse=True)
def doctest_sandbox(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A docstring example runs in its own directory, home and ``tempfile.tempdir``."""
    if not isinstance(request.node, DoctestItem):
        return
    tmp = tmp_path_factory.mktemp("doctest")
    monkeypatch.setenv("MICROVM_HOME", str(tmp / "home"))
    for name in ("MICROVM_KERNEL", "MICROVM_LIBKRUNFW"):  # restored after examples that set them
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # the examples' mkdtemp()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    """Under CI, a package doctest item's unlisted skip fails (tests/conftest.py's rule)."""
    outcome = yield
    if _in_packages(item.path):
        suite.fail_unlisted_skip(outcome.get_result(), item.nodeid)  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Under CI, a package module whose doctest collection is skipped fails too."""
    outcome = yield
    if _in_packages(collector.path):
        suite.fail_unlisted_module_skip(
            outcome.get_result(), collector.nodeid  # type: ignore[attr-defined]
        )
