"""Fuzz the guest agent's C frame reader, CBOR decoder and request parsers (host build).

Engines: libFuzzer (clang ``-fsanitize=fuzzer,address,undefined``; preferred) or
atheris driving the same C code through ctypes (gcc shared library).

    python tests/fuzz/fuzz_agent_frame.py --seconds 30
    python tests/fuzz/fuzz_agent_frame.py --engine atheris --seconds 10

The last line printed is JSON: ``{"engine", "runs", "seconds", "crashes"}``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from microvm._native_build import CSRC, compile_fuzz_library  # noqa: E402

HARNESS = r"""
#include <stddef.h>
#include <stdint.h>
int agent_fuzz_stream(const uint8_t *data, size_t len);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) { agent_fuzz_stream(data, size); return 0; }
"""


def _frame(id_: int, flags: int, body: bytes) -> bytes:
    return struct.pack(">IIB", len(body) + 5, id_, flags) + body


def seeds() -> list[bytes]:
    """Valid and borderline frames the mutator starts from."""
    import cbor2

    def f(t: str, p: object, id_: int = 1, flags: int = 0) -> bytes:
        return _frame(id_, flags, cbor2.dumps({"v": 1, "t": t, "p": p}))

    exec_req = {"cmd": "sh", "args": ["-c", "echo hi"], "env": {"A": "1"}, "cwd": "/tmp", "user": "1000:1000",
                "tty": True, "rows": 40, "cols": 120, "stdin": False, "timeout_ms": 1000,
                "rlimits": [{"resource": "nofile", "soft": 64, "hard": 128}, {"resource": "cpu", "soft": None}]}
    out = [
        f("core.hello", {"version": 1}),
        f("core.exec.request", exec_req, 2, 2),
        f("core.exec.request", {**exec_req, "env": ["A=1", "B=2"], "user": 0}, 3, 2),
        f("core.exec.stdin", {"data": b"abc"}, 2) + f("core.exec.stdin", {"data": b""}, 2),
        f("core.fs.request", {"op": "write", "path": "/x", "mode": 420, "data": b"\x00" * 40}),
        f("core.bootstrap", {"hostname": "h", "network": {"interface": "eth0", "ipv4": {
            "address": "172.16.0.2", "prefix_len": 30, "gateway": "172.16.0.1", "dns": ["172.16.0.1"]}},
            "env": {"K": "V"}, "ca_certs": ["-----BEGIN CERTIFICATE-----\nAA==\n"]}),
        _frame(5, 0, b"\xa3\x61v\x01\x61t\x69core.ping\x61p\xa0"),
        struct.pack(">I", 2) + b"\x00\x00",
        struct.pack(">IIB", 5 * 1024 * 1024, 9, 0) + b"\x00" * 64,
    ]
    return out


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(CSRC.glob("*.[ch]")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def build_libfuzzer(workdir: Path) -> Path:
    out = workdir / f"fuzz-agent-frame-{_source_hash()}"
    if out.exists():
        return out
    harness = workdir / "harness.c"
    harness.write_text(HARNESS)
    tmp = out.with_suffix(".tmp")
    subprocess.run(
        ["clang", "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined",
         "-Dmain=microvm_agent_main", "-I", str(CSRC), "-o", str(tmp), str(harness),
         *map(str, sorted(CSRC.glob("*.c")))],
        check=True,
    )
    tmp.rename(out)
    return out


def run_libfuzzer(seconds: int, workdir: Path, extra: list[str]) -> dict[str, object]:
    binary = build_libfuzzer(workdir)
    corpus = Path(tempfile.mkdtemp(prefix="corpus-", dir=workdir))
    for i, s in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(s)
    artifacts = workdir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(binary), f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-max_len=65536",
         f"-artifact_prefix={artifacts}/", *extra, str(corpus)],
        capture_output=True, text=True, check=False,
    )
    shutil.rmtree(corpus, ignore_errors=True)
    m = re.findall(r"Done (\d+) runs", proc.stderr)
    runs = int(m[-1]) if m else 0
    crashed = proc.returncode != 0
    if crashed:
        sys.stderr.write(proc.stderr[-6000:])
    return {"engine": "libfuzzer", "runs": runs, "seconds": round(time.monotonic() - t0, 1),
            "crashes": 1 if crashed else 0}


def run_atheris(seconds: int, workdir: Path) -> dict[str, object]:
    import atheris

    lib_path = workdir / f"libagentfuzz-{_source_hash()}.so"
    if not lib_path.exists():
        compile_fuzz_library(lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.agent_fuzz_stream.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.agent_fuzz_stream.restype = ctypes.c_int
    runs = 0
    corpus = seeds()
    t0 = time.monotonic()

    def one(data: bytes) -> None:
        nonlocal runs
        runs += 1
        if time.monotonic() - t0 >= seconds:
            # libFuzzer exits the process itself; report first.
            print(json.dumps({"engine": "atheris", "runs": runs, "seconds": round(time.monotonic() - t0, 1),
                              "crashes": 0}), flush=True)
            os._exit(0)
        lib.agent_fuzz_stream(data, len(data))
        if corpus:
            s = corpus[runs % len(corpus)]
            lib.agent_fuzz_stream(s[: len(data) % (len(s) + 1)] + data, len(s[: len(data) % (len(s) + 1)]) + len(data))

    atheris.Setup([sys.argv[0], f"-max_total_time={seconds + 5}", "-max_len=65536"], one)
    try:
        atheris.Fuzz()
    except SystemExit:
        pass
    return {"engine": "atheris", "runs": runs, "seconds": round(time.monotonic() - t0, 1), "crashes": 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--engine", choices=["auto", "libfuzzer", "atheris"], default="auto")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "microvm-agent-fuzz"))
    ap.add_argument("extra", nargs="*", help="extra libFuzzer flags (after --)")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        engine = "libfuzzer" if shutil.which("clang") else "atheris"
    if engine == "libfuzzer":
        result = run_libfuzzer(args.seconds, workdir, args.extra)
    else:
        result = run_atheris(args.seconds, workdir)
    print(json.dumps(result))
    return 1 if result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
