"""Build the static guest agent (``microvm/_bin/microvm-agent``) and its fuzz library.

Called by setup.py's build_ext as ``build(build_lib, inplace)``; also used on
demand by :func:`microvm.agent.agent_binary` so a dev checkout works.

Example::

    from microvm._native_build import compile_agent
    compile_agent(Path("/tmp/microvm-agent"))
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE / "agent" / "csrc"
HOST_ONLY = {"fuzz.c"}  # entry points for the fuzzer, never linked into the agent
CFLAGS = ["-std=gnu11", "-Os", "-Wall", "-Wextra", "-fno-asynchronous-unwind-tables", "-ffunction-sections",
          "-fdata-sections", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong"]
LDFLAGS = ["-static", "-s", "-Wl,--gc-sections"]


class NativeBuildError(RuntimeError):
    """The C compiler failed or is missing; the message carries its output.

    Example::

        try:
            compile_agent(out)
        except NativeBuildError as e:
            print(e)
    """


def agent_sources() -> list[Path]:
    """The agent's C sources (without host-only files).

    Example::

        print([p.name for p in agent_sources()])
    """
    return sorted(p for p in CSRC.glob("*.c") if p.name not in HOST_ONLY)


def _compiler() -> list[str]:
    cc = os.environ.get("MICROVM_AGENT_CC")
    if cc:
        return cc.split()
    musl = shutil.which("musl-gcc")
    if musl:
        return [musl]
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc:
        return [gcc]
    raise NativeBuildError("no C compiler: install musl-tools (preferred) or gcc")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NativeBuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def compile_agent(out: Path) -> Path:
    """Compile the static agent to ``out`` atomically (temp file + rename).

    Example::

        compile_agent(Path("microvm/_bin/microvm-agent"))
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".microvm-agent-", dir=out.parent)
    os.close(fd)
    try:
        _run([*_compiler(), *CFLAGS, "-I", str(CSRC), "-o", tmp, *map(str, agent_sources()), *LDFLAGS])
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def compile_fuzz_library(out: Path, sanitize: bool = False) -> Path:
    """Compile every agent source (``main`` renamed) plus fuzz.c into a host shared library.

    Example::

        lib = compile_fuzz_library(Path("/tmp/libagentfuzz.so"))
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sources = sorted(CSRC.glob("*.c"))
    san = ["-fsanitize=undefined", "-fno-sanitize-recover=all"] if sanitize else []
    fd, tmp = tempfile.mkstemp(prefix=".libagentfuzz-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cc = shutil.which("gcc") or shutil.which("cc") or "cc"
        _run([cc, "-std=gnu11", "-O1", "-g", "-shared", "-fPIC", "-Wall", *san, "-Dmain=microvm_agent_main",
              "-I", str(CSRC), "-o", tmp, *map(str, sources)])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build(build_lib: str, inplace: bool) -> None:
    """setup.py hook: build the agent in place and/or into ``build_lib`` for wheels.

    Example::

        build("build/lib.linux-x86_64-3.11", inplace=True)
    """
    targets = []
    if inplace:
        targets.append(HERE / "_bin" / "microvm-agent")
    if build_lib:
        targets.append(Path(build_lib) / "microvm" / "_bin" / "microvm-agent")
    built: Path | None = None
    for t in targets:
        if built is None:
            built = compile_agent(t)
        elif t.resolve() != built.resolve():
            t.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, t)
