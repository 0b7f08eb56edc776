"""Fixtures shared by the gateway tests: a private $MICROVM_HOME per test, and the
``uplinks`` marker: ``@pytest.mark.uplinks("tap", why=...)`` keeps a scenario that only
applies to some uplinks from being generated for the others (deselected, not skipped:
under CI a skip is a failure, and a scenario that cannot apply is no missing binary)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netstack_gateway.dns_server import AuthServer


@pytest.fixture
def auth() -> Iterator[AuthServer]:
    """A real authoritative DNS server on loopback (tests/netstack_gateway/dns_server.py)."""
    server = AuthServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MICROVM_HOME (slot locks and uplink records go there)."""
    h = tmp_path / "mvhome"
    h.mkdir()
    monkeypatch.setenv("MICROVM_HOME", str(h))
    return h


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the ``rig`` parameters a test's ``uplinks`` marker excludes."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("uplinks")
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get("rig") if callspec is not None else None
        if marker is not None and kind is not None and kind not in marker.args:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
