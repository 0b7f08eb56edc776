"""The layering rule holds: ``rootfs``, ``netstack`` and ``tls_proxy`` never import each
other or ``microvm`` (pyproject.toml's ``[tool.importlinter]`` contracts, checked by
``lint-imports``: every import counts, inside functions and under ``TYPE_CHECKING`` too);
and the packages' public surfaces: every error exported, ``netstack`` apart from its
privileged ``netstack.gateway``, a running example on every public item.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_leaves_import_neither_each_other_nor_microvm(tmp_path: Path) -> None:
    r = lint_imports(tmp_path, ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout, r.stdout


def test_the_contracts_catch_a_leaf_importing_upward_or_sideways(tmp_path: Path) -> None:
    """The same contracts over a fake tree that breaks both rules report both."""
    for pkg, body in [("rootfs", "def f() -> None:\n    import microvm\n"),
                      ("netstack", "from tls_proxy import x\n"),
                      ("tls_proxy", "x = 1\n"), ("microvm", "import rootfs\n")]:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(body)
    r = lint_imports(tmp_path, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "0 kept, 2 broken" in r.stdout, r.stdout
    assert "rootfs -> microvm" in r.stdout and "netstack -> tls_proxy" in r.stdout, r.stdout


# The public surfaces: each package's errors are all exported, and every exported class
# and function shows a running ``>>>`` example (collected by pytest --doctest-modules).
ERRORS = {"rootfs": "rootfs.errors", "netstack": "netstack.errors",
          "tls_proxy": "tls_proxy.errors", "microvm": "microvm.errors"}
GATEWAY_ERRORS = {"GatewayError", "AddressPlanError", "UplinkError", "DnsForwarderError",
                  "PcapError"}


@pytest.mark.parametrize("package", sorted(ERRORS))
def test_every_error_is_exported(package: str) -> None:
    pkg = importlib.import_module(package)
    errors = importlib.import_module(ERRORS[package])
    defined = {n for n, o in vars(errors).items()
               if inspect.isclass(o) and issubclass(o, Exception) and o.__module__ == errors.__name__}
    assert defined, ERRORS[package]
    assert defined <= set(pkg.__all__), f"{package} does not export {defined - set(pkg.__all__)}"
    if package == "netstack":
        gateway = importlib.import_module("netstack.gateway")
        assert set(gateway.__all__) >= GATEWAY_ERRORS


def test_netstack_is_the_policy_model_and_the_gateway_is_apart() -> None:
    """``netstack`` exports no gateway plumbing; ``netstack.gateway`` has it."""
    import netstack
    import netstack.gateway

    plumbing = {"AddressPlan", "DnsForwarder", "Gateway", "PasstUplink", "PcapWriter",
                "SlotLease", "TapUplink", "Uplink", "allocate_slot", "cleanup_stale"}
    assert not plumbing & set(netstack.__all__)
    assert plumbing <= set(netstack.gateway.__all__)
    assert "microvm_home" not in netstack.gateway.__all__


@pytest.mark.parametrize("package", ["rootfs", "netstack", "netstack.gateway", "tls_proxy",
                                     "microvm", "microvm.kernel"])
def test_every_public_item_has_a_running_example(package: str) -> None:
    pkg = importlib.import_module(package)
    missing = set()
    for name in pkg.__all__:
        obj = getattr(pkg, name)
        documented = ">>>" in (inspect.getdoc(obj) or "")
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not documented:
            missing.add(name)
    assert not missing, f"{package}: no >>> example for {sorted(missing)}"
