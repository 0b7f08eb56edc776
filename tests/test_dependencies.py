"""Every external program the packages and the test suite run is installed by ./setup.sh.

The sources are parsed with :mod:`ast` for the program names given to
``shutil.which``, ``require_binaries`` and ``subprocess``/``asyncio`` argv[0]
literals (also the program after ``ip netns exec NS``, the first argument of a
``_run("prog", ...)`` helper and the argv of a topology's ``run_in_guest``); each
must be provided by a Debian package listed in ``deps/apt.txt`` (``dpkg -S``), by an
essential package (on every Debian system), or by the Python environment the suite
runs in. Python itself must be ``sys.executable``, never a ``python3`` looked up on
PATH.

Also: setup.sh's virtual environment, the clang runtimes the fuzz targets link,
and pyproject metadata that setuptools reads without deprecation warnings.
"""

from __future__ import annotations

import ast
import functools
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("netstack", "tls_proxy", "rootfs", "microvm", "tests", "benchmarks")
SUBPROCESS_FUNCS = {
    "run", "Popen", "call", "check_call", "check_output", "getoutput",
    "create_subprocess_exec", "spawn", "_run", "execvp", "execv", "run_in_guest",
}  # fmt: skip
# helpers called as ``_run("prog", "arg", ...)``: the program is the first argument itself
STAR_ARGV_FUNCS = {"_run"}
# programs that are not host programs: run inside a guest or named only in messages
NOT_HOST_PROGRAMS: set[str] = set()
# names looked up only as a fallback for another distribution: fine when the first
# choice (the value) is provided here
ALTERNATIVES = {"virtiofsd": "/usr/lib/qemu/virtiofsd"}


def _apt_packages() -> set[str]:
    lines = (ROOT / "deps" / "apt.txt").read_text().splitlines()
    return {ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()}


def _py_files() -> Iterator[Path]:
    for d in SOURCE_DIRS:
        for p in sorted((ROOT / d).rglob("*.py")):
            if "agent_guest" not in p.parts:
                yield p


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "literal"`` assignments (e.g. ``VIRTIOFSD = "/usr/lib/qemu/virtiofsd"``)."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for t in node.targets:
                if isinstance(t, ast.Name) and isinstance(node.value.value, str):
                    out[t.id] = node.value.value
    return out


def _str(node: ast.expr, consts: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return consts.get(node.id)
    return None


def _func_name(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Attribute):
        return f.attr
    if isinstance(f, ast.Name):
        return f.id
    return ""


def _argv_programs(argv: ast.expr, consts: dict[str, str]) -> list[str]:
    """argv[0] of a literal list/tuple (and the program run by ``ip netns exec NS``)."""
    if not isinstance(argv, (ast.List, ast.Tuple)) or not argv.elts:
        return []
    words = [_str(e, consts) for e in argv.elts]
    first = words[0]
    if first is None:
        return []
    out = [first]
    if words[:3] == ["ip", "netns", "exec"] and len(words) > 4 and words[4] is not None:
        out.append(words[4])
    return out


@functools.cache
def collect_programs() -> dict[str, list[str]]:
    """Program name -> the source locations that run or look it up."""
    found: dict[str, list[str]] = {}
    for path in _py_files():
        tree = ast.parse(path.read_text(), str(path))
        consts = _constants(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _func_name(node)
            names: list[str] = []
            if name == "which" or name == "require_binaries":
                names = [s for a in node.args if (s := _str(a, consts)) is not None]
            elif name in SUBPROCESS_FUNCS and node.args:
                first = _str(node.args[0], consts)
                if name == "create_subprocess_exec" or (name in STAR_ARGV_FUNCS and first is not None):
                    names = [first] if first is not None else []
                else:
                    names = _argv_programs(node.args[0], consts)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for n in names:
                if n and not n.startswith("-") and n not in NOT_HOST_PROGRAMS:
                    found.setdefault(n, []).append(where)
    return found


def _dpkg_owner(path: str) -> str | None:
    """The Debian package that ships ``path`` (tries the /usr-merged twin), or None."""
    candidates = [path]
    if path.startswith("/usr/"):
        candidates.append(path[4:])
    else:
        candidates.append("/usr" + path)
    for c in candidates:
        r = subprocess.run(["dpkg", "-S", c], capture_output=True, text=True)
        if r.returncode == 0:
            for line in r.stdout.splitlines():
                pkgs, _, file = line.partition(": ")
                if file.strip() == c and not pkgs.startswith("diversion by"):
                    return pkgs.split(",")[0].split(":")[0].strip()
    return None


@functools.cache
def _essential(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Essential}", pkg], capture_output=True, text=True)
    return r.stdout.strip() == "yes"


def _symlink_chain(path: str) -> list[str]:
    """``path`` and every hop of its symlinks (e.g. cc -> /etc/alternatives/cc -> /usr/bin/gcc)."""
    chain = [path]
    while os.path.islink(chain[-1]) and len(chain) < 10:
        nxt = os.path.join(os.path.dirname(chain[-1]), os.readlink(chain[-1]))
        chain.append(os.path.normpath(nxt))
    chain.append(os.path.realpath(path))
    return list(dict.fromkeys(chain))


def _provider(program: str) -> str:
    """Who provides ``program`` here: 'venv', 'apt:<pkg>', 'essential:<pkg>', or a problem."""
    exe = program if os.path.isabs(program) else shutil.which(program)
    if exe is None or not os.path.exists(exe):
        if program in ALTERNATIVES:
            return _provider(ALTERNATIVES[program])
        return "MISSING (not installed: add its package to deps/apt.txt and run ./setup.sh)"
    env_bin = Path(sys.prefix) / "bin"
    if Path(exe).parent == env_bin or Path(exe).resolve().parent == env_bin.resolve():
        return "venv"
    apt = _apt_packages()
    seen: list[str] = []
    for p in _symlink_chain(exe):
        pkg = _dpkg_owner(p)
        if pkg is None:
            continue
        if pkg in apt:
            return f"apt:{pkg}"
        if _essential(pkg):
            return f"essential:{pkg}"
        seen.append(pkg)
    if seen:
        return f"NOT LISTED (package {seen[0]} is not in deps/apt.txt)"
    return f"UNPACKAGED ({exe} belongs to no Debian package and is not in {env_bin})"


needs_dpkg = pytest.mark.skipif(
    not shutil.which("dpkg"), reason="needs dpkg (the project targets Debian/Ubuntu)"
)


def test_collector_finds_known_programs() -> None:
    """The collector sees each kind of call site (guards against it silently finding nothing)."""
    progs = collect_programs()
    assert "qemu-system-x86_64" in progs  # shutil.which and require_binaries
    assert "ping" in progs  # require_binaries in the gateway e2e tests
    assert "/usr/lib/qemu/virtiofsd" in progs  # require_binaries(VIRTIOFSD), a module constant
    assert "iperf3" in progs  # ip netns exec NS iperf3
    assert "sysctl" in progs  # _run("sysctl", ...) in netstack/serve.py
    assert "clang" in progs


def test_no_python_from_path() -> None:
    """Subprocesses run Python as sys.executable, so they use the environment the suite runs in."""
    bad = {p: w for p, w in collect_programs().items() if os.path.basename(p).startswith("python")}
    assert not bad, f"use sys.executable instead of: {bad}"


@needs_dpkg
def test_every_program_comes_from_deps_apt_or_the_environment() -> None:
    problems = []
    for program, where in sorted(collect_programs().items()):
        how = _provider(program)
        if how.split(":")[0] not in ("venv", "apt", "essential"):
            problems.append(f"{program}: {how} (used at {', '.join(where[:3])})")
    assert not problems, "\n".join(problems)


@needs_dpkg
def test_fuzz_runtimes_come_from_deps_apt() -> None:
    """clang alone has no libFuzzer/ASan runtimes: the short fuzz runs need libclang-rt-*-dev."""
    clang = shutil.which("clang")
    assert clang, "clang is missing (deps/apt.txt lists it)"
    problems = []
    for lib in ("libclang_rt.fuzzer-x86_64.a", "libclang_rt.asan-x86_64.a"):
        r = subprocess.run([clang, f"-print-file-name={lib}"], capture_output=True, text=True)
        path = r.stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            problems.append(f"{lib}: not installed (clang -print-file-name gave {path!r})")
            continue
        pkg = _dpkg_owner(path) or _dpkg_owner(os.path.realpath(path))
        if pkg not in _apt_packages():
            problems.append(f"{lib}: from package {pkg}, which deps/apt.txt does not list")
    assert not problems, "\n".join(problems)


def test_checkout_is_what_python_imports() -> None:
    """The packages import from this checkout (no other checkout's editable install wins)."""
    import microvm
    import netstack
    import rootfs
    import tls_proxy

    for mod in (netstack, tls_proxy, rootfs, microvm):
        assert mod.__file__ is not None
        assert Path(mod.__file__).resolve().is_relative_to(ROOT), (mod.__name__, mod.__file__)


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI runs in setup.sh's .venv (run-tests.sh)")
def test_ci_runs_in_the_checkouts_venv() -> None:
    """Under CI the suite runs in ./.venv made by setup.sh, not the system interpreter."""
    assert Path(sys.prefix).resolve() == (ROOT / ".venv").resolve(), sys.prefix
    assert sys.prefix != sys.base_prefix


def test_pyproject_metadata_has_no_setuptools_deprecations() -> None:
    """setuptools reads pyproject.toml without a deprecation warning (SPDX license string)."""
    import tomllib

    from setuptools.config.pyprojecttoml import read_configuration

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(meta["license"], str)  # an SPDX expression, not a {text = ...} table
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_configuration(ROOT / "pyproject.toml")


def test_ci_turns_unlisted_skips_into_failures(tmp_path: Path) -> None:
    """Under CI=true a skip fails with its reason (test or whole module); elsewhere it stays a skip."""
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n"
        "def test_needs_tool():\n    pytest.skip('needs frobnicator')\n"
        "def test_fine():\n    pass\n"
        "@pytest.mark.xfail(reason='known')\ndef test_known():\n    assert False\n"
    )
    (tmp_path / "test_mod.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_xyz')\n"
    )
    def pytest_run(target: str, ci: bool, *extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        env["PYTHONPATH"] = str(ROOT)
        if ci:
            env["CI"] = "true"
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "--rootdir",
                str(tmp_path), "-c", os.devnull, "-p", "no:cacheprovider", str(tmp_path / target), *extra]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)

    plain = pytest_run("test_probe.py", ci=False)
    assert plain.returncode == 0 and "1 passed, 1 skipped, 1 xfailed" in plain.stdout, plain.stdout
    assert pytest_run("test_mod.py", ci=False).returncode == 5  # skipped module: no tests ran
    ci = pytest_run("test_probe.py", ci=True)
    assert ci.returncode == 1 and "1 failed, 1 passed, 1 xfailed" in ci.stdout, ci.stdout
    assert "skipped under CI=true: needs frobnicator" in ci.stdout
    ci = pytest_run("test_mod.py", ci=True)
    assert ci.returncode != 0 and "module skipped under CI=true" in ci.stdout, ci.stdout
    assert "no_such_module_xyz" in ci.stdout
    # docstring examples: one marked +SKIP throughout is deselected (not a test), a skip fails
    (tmp_path / "mod_doc.py").write_text(
        'def needs_root():\n    """\n    >>> needs_root()  # doctest: +SKIP\n    """\n'
        'def probes():\n    """\n    >>> import pytest; pytest.skip("needs frobnicator")\n    """\n'
    )
    ci = pytest_run("mod_doc.py", True, "--doctest-modules")
    assert ci.returncode == 1 and "1 failed, 1 deselected" in ci.stdout, ci.stdout
    assert "skipped under CI=true: needs frobnicator" in ci.stdout


# -- Python dependencies: pyproject's lists match what the code imports -------------------
FIRST_PARTY = {"rootfs", "netstack", "tls_proxy", "microvm", "tests", "benchmarks", "conftest"}
PACKAGES = ("rootfs", "netstack", "tls_proxy", "microvm")
BUILD_ONLY = {"setuptools"}  # [build-system] requires: the tests read pyproject with it


def _norm(dist: str) -> str:
    return dist.lower().replace("_", "-").replace(".", "-")


def _requirements() -> dict[str, set[str]]:
    """``"main"`` and each extra -> the distribution names it lists (normalized)."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"main": project["dependencies"], **project["optional-dependencies"]}
    name = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
    out: dict[str, set[str]] = {}
    for group, reqs in groups.items():
        found = set()
        for r in reqs:
            m = name.match(r)
            assert m is not None, f"unparsable requirement {r!r} in {group}"
            found.add(_norm(m.group(0)))
        out[group] = found
    return out


@functools.cache
def _third_party_imports(dirs: tuple[str, ...]) -> dict[str, list[str]]:
    """Top-level module -> files under ``dirs`` importing it (stdlib and our own left out)."""
    local = {p.stem for d in ("tests", "benchmarks") for p in (ROOT / d).rglob("*.py")}
    found: dict[str, list[str]] = {}
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            if "agent_guest" in path.parts:
                continue
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    top = m.split(".")[0]
                    if top in sys.stdlib_module_names or top in FIRST_PARTY or top in local:
                        continue
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


@functools.cache
def _import_names() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return dict(packages_distributions())


def _distributions(module: str) -> set[str]:
    """Distributions providing ``module`` (not installed here: guessed from its name)."""
    return {_norm(d) for d in _import_names().get(module, [module])}


def _undeclared(dirs: tuple[str, ...], allowed: set[str]) -> list[str]:
    problems = []
    for module, files in sorted(_third_party_imports(dirs).items()):
        dists = _distributions(module)
        if not dists & allowed:
            problems.append(f"{module} (distribution {', '.join(sorted(dists)) or 'unknown'}) "
                            f"imported by {files[0]} is not declared")
    return problems


def test_packages_import_only_declared_dependencies() -> None:
    """The packages import only the main dependencies (and an optional feature's extra)."""
    reqs = _requirements()
    optional = set().union(*(v for k, v in reqs.items() if k not in ("main", "test", "dev")))
    assert not _undeclared(PACKAGES, reqs["main"] | optional)
    # an extra-only import stays out of the main import path (e.g. ray: microvm.fleet)
    for module, files in _third_party_imports(PACKAGES).items():
        if _distributions(module) & reqs["main"]:
            continue
        assert all(f.startswith("microvm/fleet/") for f in files), (module, files)


def test_tests_and_benchmarks_import_only_declared_dependencies() -> None:
    """Every library the suite and the benchmarks import is in the main list or an extra."""
    reqs = _requirements()
    allowed = set().union(*reqs.values()) - reqs["dev"] | BUILD_ONLY
    assert not _undeclared(("tests", "benchmarks"), allowed)


def test_every_test_dependency_is_used() -> None:
    """No library sits in the test extra unused (one DNS library: dnspython, not dnslib too).

    Used means imported by tests/benchmarks, a pytest plugin, or a console script the
    tests run (``lint-imports``).
    """
    from importlib.metadata import distribution

    imported = set().union(*(_distributions(m) for m in _third_party_imports(("tests", "benchmarks"))))
    sources = "\n".join(p.read_text() for d in ("tests", "benchmarks")
                        for p in (ROOT / d).rglob("*.py"))
    unused = []
    for dist in sorted(_requirements()["test"]):
        if dist in imported:
            continue
        eps = distribution(dist).entry_points
        if any(ep.group == "pytest11" for ep in eps):
            continue
        if any(ep.group == "console_scripts" and f'"{ep.name}"' in sources for ep in eps):
            continue
        unused.append(dist)
    assert not unused, f"test extra lists unused {unused}: drop them from pyproject.toml"
    assert "dnslib" not in set().union(*_requirements().values())


def test_setup_installs_the_extras_ci_needs() -> None:
    """setup.sh installs the test and dev extras; dev holds the tools run-tests.sh runs."""
    import re

    setup = (ROOT / "setup.sh").read_text()
    m = re.search(r"pip install [^\n]*-e '\.\[([a-z0-9,]+)\]'", setup)
    assert m is not None, "setup.sh installs the package with: pip install -e '.[extras]'"
    installed = set(m.group(1).split(","))
    assert {"test", "dev"} <= installed
    reqs = _requirements()
    assert set(reqs) - {"main"} <= installed, "an extra setup.sh does not install: CI lacks it"
    run_tests = (ROOT / "run-tests.sh").read_text()
    for tool in ("ruff", "mypy"):
        assert f"-m {tool}" in run_tests
        assert tool in reqs["dev"] and tool not in reqs["test"] | reqs["main"]
