"""Shared setup of the netstack atheris targets: an ASan+UBSan build of the C fast path.

``bootstrap()`` builds (once, into ``build/asan/``) the sanitizer variant of
``netstack._fastpath`` with clang ``-fsanitize=address,undefined,fuzzer-no-link``
and a shared runtime holding ASan, UBSan and libFuzzer (the equivalent of
atheris' ``asan_with_fuzzer.so``, merged from clang's static runtimes), then
re-executes the interpreter with that runtime in ``LD_PRELOAD`` and loads the
sanitizer build as ``netstack._fastpath`` - so libFuzzer sees C coverage and
any out-of-bounds read aborts the run with a report.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASAN_DIR = os.path.join(ROOT, "build", "asan")
RUNTIME = os.path.join(ASAN_DIR, "asan_with_fuzzer.so")
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def _clang_lib_dir() -> str:
    out = subprocess.run(["clang", "-print-file-name=libclang_rt.asan-x86_64.a"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return os.path.dirname(out)


def ensure_runtime() -> str:
    """Build the merged ASan+UBSan+libFuzzer runtime if missing; return its path."""
    if os.path.exists(RUNTIME):
        return RUNTIME
    os.makedirs(ASAN_DIR, exist_ok=True)
    libdir = _clang_lib_dir()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["ar", "x", os.path.join(libdir, "libclang_rt.asan-x86_64.a")],
                       cwd=tmp, check=True)
        os.remove(os.path.join(tmp, "asan_preinit.cpp.o"))  # .preinit_array is not allowed in a DSO
        objs = sorted(glob.glob(os.path.join(tmp, "*.o")))
        part = RUNTIME + ".part"
        subprocess.run(["clang++", "-shared", "-o", part, *objs, "-Wl,--whole-archive",
                        os.path.join(libdir, "libclang_rt.fuzzer_no_main-x86_64.a"),
                        os.path.join(libdir, "libclang_rt.asan_cxx-x86_64.a"),
                        "-Wl,--no-whole-archive", "-lpthread", "-ldl", "-lrt"], check=True)
        os.replace(part, RUNTIME)
    return RUNTIME


def _extension_path() -> str | None:
    found = glob.glob(os.path.join(ASAN_DIR, "_fastpath*.so"))
    return found[0] if found else None


def ensure_extension() -> str:
    """Build the sanitizer variant of the extension if missing or stale; return its path."""
    path = _extension_path()
    sources = glob.glob(os.path.join(ROOT, "netstack", "csrc", "*"))
    sources.append(os.path.join(ROOT, "netstack", "_cffi_build.py"))
    newest = max(os.path.getmtime(s) for s in sources)
    if path is None or os.path.getmtime(path) < newest:
        env = dict(os.environ, NETSTACK_SANITIZE="1", NETSTACK_SANITIZE_OUT=ASAN_DIR,
                   CC="clang", LDSHARED="clang -shared")
        env.pop("LD_PRELOAD", None)
        subprocess.run([sys.executable, os.path.join(ROOT, "netstack", "_cffi_build.py")],
                       env=env, check=True, cwd=ROOT)
        path = _extension_path()
    assert path is not None
    return path


def bootstrap() -> ModuleType:
    """Re-exec under the sanitizer runtime if needed; load the ASan extension; return atheris."""
    if not shutil.which("clang"):
        raise SystemExit("fuzzing needs clang (apt-get install clang)")
    runtime = RUNTIME
    if runtime not in os.environ.get("LD_PRELOAD", ""):
        ensure_runtime()
        ensure_extension()
        env = dict(os.environ)
        env["LD_PRELOAD"] = runtime
        env.setdefault("ASAN_OPTIONS", "detect_leaks=0:allocator_may_return_null=1:"
                                       "abort_on_error=1:symbolize=1")
        env.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import atheris

    load_extension()
    sys.path.insert(0, ROOT)
    return atheris


def load_extension() -> None:
    """Build the sanitizer variant if stale and import it as ``netstack._fastpath``
    (the ASan runtime must already be loaded in this process)."""
    path = ensure_extension()
    loader = importlib.machinery.ExtensionFileLoader("netstack._fastpath", path)
    spec = importlib.util.spec_from_file_location("netstack._fastpath", path, loader=loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["netstack._fastpath"] = mod
    loader.exec_module(mod)


def fuzz_args(argv: list[str], corpus: str) -> list[str]:
    """libFuzzer arguments: the user's, plus (when no corpus is given) a scratch
    output corpus seeded from ``tests/fuzz/corpus/<corpus>`` and a scratch
    artifact prefix, so a run never writes into the source tree."""
    args = list(argv)
    if not any(not a.startswith("-") for a in args[1:]):
        scratch = tempfile.mkdtemp(prefix=f"netstack-fuzz-{corpus}-")
        args += [scratch, os.path.join(CORPUS, corpus)]
        if not any(a.startswith("-artifact_prefix=") for a in args):
            args.append(f"-artifact_prefix={scratch}/")
    return args
