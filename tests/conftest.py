"""Pytest configuration shared by every test module.

Under ``CI=true`` a skipped test is a failure (with the skip's reason), unless its
node id is in :data:`CI_ALLOWED_SKIPS`, the one place that lists what CI may skip
and why: a missing binary in CI must fail loudly, not skip. The rule covers the
packages' docstring examples too (the repository's root ``conftest.py`` hands their
items to :func:`fail_unlisted_skip`). An example marked ``# doctest: +SKIP`` throughout
documents a call that needs root, a guest or a network: it is read, not run, so it is
no test and is deselected at collection (it never counts as a skip). ``./setup.sh``
installs everything else the suite needs (tests/test_dependencies.py keeps it so).
"""

from __future__ import annotations

import contextlib
import doctest
import fnmatch
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# tests/fuzz holds atheris targets run as scripts (tests/*/test_*fuzz*.py): importing one
# re-executes the interpreter under the sanitizer runtime, so --doctest-modules must not.
collect_ignore = ["fuzz"]

@pytest.fixture(scope="session", autouse=True)
def _session_zygotes() -> Iterator[None]:
    """The shared supervisor zygotes the session's ``microvm`` commands start (they
    outlive a command: microvm/sandbox/_zygote.py) live in a directory of this session
    (``$MICROVM_ZYGOTE_DIR``) and are stopped at its end: none outlives the session."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="mvzyg-")
    saved = os.environ.get("MICROVM_ZYGOTE_DIR")
    os.environ["MICROVM_ZYGOTE_DIR"] = d
    try:
        yield
    finally:
        from microvm.sandbox import _zygote as zygote

        zygote.stop_shared(Path(d))
        shutil.rmtree(d, ignore_errors=True)
        if saved is None:
            os.environ.pop("MICROVM_ZYGOTE_DIR", None)
        else:
            os.environ["MICROVM_ZYGOTE_DIR"] = saved


# node id (without parameters) -> why CI may skip it. Keep this short.
CI_ALLOWED_SKIPS: dict[str, str] = {
    "tests/microvm/test_libkrun.py::test_real_libkrun_boot": (
        "needs libkrun.so.1 (not packaged in Debian 12) and real KVM (vmx/svm); "
        "CI's /dev/kvm is nested PVM"
    ),
}


def in_ci() -> bool:
    """True when the ``CI`` environment variable is set to a true value (CI sets ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _allowed(nodeid: str) -> bool:
    return nodeid.split("[", 1)[0] in CI_ALLOWED_SKIPS


def _read_only_example(item: pytest.Item) -> bool:
    """A docstring example whose every line is ``# doctest: +SKIP`` (nothing in it runs)."""
    from _pytest.doctest import DoctestItem

    if not isinstance(item, DoctestItem) or item.dtest is None:
        return False
    examples = item.dtest.examples
    return bool(examples) and all(ex.options.get(doctest.SKIP, False) for ex in examples)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the docstring examples marked ``+SKIP`` throughout: they are documentation
    of calls that need root, a guest or a network, not tests, so they never show up as
    skips (the skip count is then exactly what :data:`CI_ALLOWED_SKIPS` allows)."""
    dropped = [item for item in items if _read_only_example(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        kept = set(map(id, dropped))
        items[:] = [item for item in items if id(item) not in kept]


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def fail_unlisted_skip(rep: pytest.TestReport, nodeid: str) -> None:
    """Under CI, turn ``rep``, a skip that is not allow-listed, into a failure with its reason."""
    if rep.skipped and in_ci() and not hasattr(rep, "wasxfail") and not _allowed(nodeid):
        reason = _skip_reason(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (
            f"skipped under CI=true: {reason}\n"
            f"(CI may skip only the tests in CI_ALLOWED_SKIPS, tests/conftest.py; "
            f"install what is missing through deps/apt.txt and ./setup.sh)"
        )


def fail_unlisted_module_skip(rep: pytest.CollectReport, nodeid: str) -> None:
    """Under CI, turn ``rep``, a module skipped at import and not allow-listed, into a failure."""
    if rep.skipped and in_ci() and not _allowed(nodeid):
        rep.outcome = "failed"
        rep.longrepr = (
            f"module skipped under CI=true: {_skip_reason(rep.longrepr)} "
            f"(not in CI_ALLOWED_SKIPS, tests/conftest.py)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    """Under CI, turn a skip that is not allow-listed into a failure that keeps the reason."""
    outcome = yield
    fail_unlisted_skip(outcome.get_result(), item.nodeid)  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Under CI, a whole module skipped at import (importorskip, allow_module_level) fails too."""
    outcome = yield
    fail_unlisted_module_skip(outcome.get_result(), collector.nodeid)  # type: ignore[attr-defined]


#: file names the tests give private keys (servers' TLS keys, CA keys, SSH host keys)
_PRIVATE_KEY_GLOBS = ("*.key", "*key.pem", "*-key.pem", "id_ed25519", "id_rsa", "ssh_host_*_key")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Private keys never outlive the run that made them: pytest keeps its last basetemps
    (``/tmp/pytest-of-<user>``) for debugging, but not the keys the tests wrote there.
    A session that never asked for a tmp_path has no basetemp (``getbasetemp()`` would
    make one): nothing to do then. One walk, not following symlinked directories (as
    ``Path.rglob``)."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    base: Path | None = getattr(factory, "_basetemp", None)  # pytest's own sessionfinish reads it so
    if base is None:
        return
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            if any(fnmatch.fnmatchcase(name, g) for g in _PRIVATE_KEY_GLOBS):
                path = Path(dirpath, name)
                with contextlib.suppress(OSError):
                    if path.is_file() and not path.is_symlink():
                        path.unlink()
