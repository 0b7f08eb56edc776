"""CLI benchmark: what the ``microvm`` command adds on top of the library.

Same image (busybox), 512 MiB guests, network ``none``, in a private ``$MICROVM_HOME``;
the two paths interleaved per round:

* ``cli_run_s``: wall time of ``microvm run --rm --net none IMAGE true`` (a new Python
  process: imports, create, exec, stop, remove), median;
* ``library_run_s``: ``Sandbox.create`` + ``exec("true")`` + ``Sandbox.remove`` in this
  process, median (its supervisors fork from this process's zygote, warm after round 0;
  each ``microvm run`` connects to the user's shared zygote first thing and forks its
  supervisor from it: round 0 starts it, and it outlives the command, as it would for
  back-to-back commands: :func:`microvm._cli_util.prestart_supervisor`);
* ``cli_vs_library_ratio`` = ``library_run_s / cli_run_s`` (target >= 0.9: the command
  adds little);
* ``exec_ms``: ``microvm exec NAME true`` round trip on a running sandbox (a new process
  each time), median; ``library_exec_ms`` the same exec in-process;
* ``cli_startup_ms``: ``microvm --version`` (interpreter start + the CLI's own imports),
  median; ``cli_import_stack_ms``: a new interpreter importing ``microvm.Sandbox`` and
  what ``run`` needs (``rootfs``, ``netstack``, ``tls_proxy``), median: the part of
  ``cli_run_s`` the in-process path has already paid.

Bytecode: every process here (the CLI, and the sandbox supervisors of both paths) runs with
a private ``PYTHONPYCACHEPREFIX`` and bytecode writing on (``PYTHONDONTWRITEBYTECODE`` is
dropped), as an installed package has its ``.pyc`` files; warm-up round 0 fills that cache.
Without it every CLI start recompiles the whole stack from source.

    python -m benchmarks.cli [--quick]     # last line: one JSON object
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import rootfs
from benchmarks._common import quick_main
from benchmarks._sandbox_rig import busybox_root

IMAGE = "local/clibench:1"


def _timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t


def _cli(*argv: str) -> float:
    return _timed([sys.executable, "-m", "microvm", *argv])


_STACK = ("from microvm import Sandbox; import microvm.sandbox._sandbox, microvm._cli_sandbox, "
          "rootfs, netstack.gateway, tls_proxy")


def run(quick: bool) -> dict[str, Any]:
    """Measure (see the module docstring); returns the result dict.

    Example::

        print(run(quick=True)["cli_vs_library_ratio"])
    """
    from microvm import Sandbox

    rounds = 3 if quick else 7
    execs = 10 if quick else 30
    home = Path(tempfile.mkdtemp(prefix="clibench-home-"))
    saved = {k: os.environ.get(k)
             for k in ("MICROVM_HOME", "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    os.environ["MICROVM_HOME"] = str(home)
    os.environ["PYTHONPYCACHEPREFIX"] = str(home / "pycache")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        work = Path(tempfile.mkdtemp(prefix="clibench-root-", dir=home))
        rootfs.build_image(busybox_root(work / "root"), IMAGE, rootfs.ImageStore(),
                           config={"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]})
        shutil.rmtree(work)
        cli_s: list[float] = []
        lib_s: list[float] = []
        for i in range(rounds + 1):          # round 0 warms caches (prepared root, kvm probe)
            c = _cli("run", "--rm", "--name", f"clib{i}", "--net", "none", IMAGE, "true")
            t = time.perf_counter()
            sb = Sandbox.create(f"libb{i}", image=IMAGE, network="none")
            sb.exec("true")
            sb.close()
            Sandbox.remove(f"libb{i}")
            lib = time.perf_counter() - t
            if i:
                cli_s.append(c)
                lib_s.append(lib)
        sb = Sandbox.create("clibexec", image=IMAGE, network="none", detached=True)
        try:
            exec_cli = [_cli("exec", "clibexec", "true") for _ in range(execs)]
            exec_lib = []
            for _ in range(execs):
                t = time.perf_counter()
                sb.exec("true")
                exec_lib.append(time.perf_counter() - t)
        finally:
            sb.close()
            Sandbox.remove("clibexec")
        _timed([sys.executable, "-c", _STACK])   # fills the bytecode cache
        startup = [_cli("--version") for _ in range(execs)]
        stack = [_timed([sys.executable, "-c", _STACK]) for _ in range(rounds)]
        cli_run, lib_run = statistics.median(cli_s), statistics.median(lib_s)
        return {
            "benchmark": "cli", "quick": quick, "rounds": rounds,
            "cli_run_s": round(cli_run, 3), "library_run_s": round(lib_run, 3),
            "cli_vs_library_ratio": round(lib_run / cli_run, 3),
            "exec_ms": round(statistics.median(exec_cli) * 1000, 1),
            "library_exec_ms": round(statistics.median(exec_lib) * 1000, 1),
            "cli_startup_ms": round(statistics.median(startup) * 1000, 1),
            "cli_import_stack_ms": round(statistics.median(stack) * 1000, 1),
        }
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    """``python -m benchmarks.cli [--quick]``: the last line printed is the JSON result."""
    quick_main(__doc__, run, "3 rounds, 10 execs")


if __name__ == "__main__":
    main()
