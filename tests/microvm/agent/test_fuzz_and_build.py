"""The agent binary (static, small) and short fuzz / property runs of its C decoder."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microvm._native_build import compile_fuzz_library

ROOT = Path(__file__).resolve().parents[3]


def test_binary_is_static_and_small(agent_bin: Path) -> None:
    data = agent_bin.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert len(data) < 200 * 1024, f"agent is {len(data)} bytes"
    assert b"/lib64/ld-linux" not in data and b"ld-musl" not in data  # no PT_INTERP
    out = subprocess.run([str(agent_bin), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("microvm-agent ")
    bad = subprocess.run([str(agent_bin), "--bogus"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "usage" in bad.stderr
    # Not PID 1 and no channel: refuses to act as init.
    assert subprocess.run([str(agent_bin)], capture_output=True, check=False).returncode == 2


@pytest.fixture(scope="module")
def fuzzlib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(compile_fuzz_library(tmp_path_factory.mktemp("fz") / "libagentfuzz.so")))
    lib.agent_cbor_roundtrip.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.agent_cbor_roundtrip.restype = ctypes.c_int
    lib.agent_fuzz_stream.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.utf8_valid.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.utf8_valid.restype = ctypes.c_bool
    return lib


def _roundtrip(lib: ctypes.CDLL, data: bytes) -> bytes | None:
    out = ctypes.create_string_buffer(len(data) * 2 + 64)
    n = ctypes.c_size_t()
    rc = lib.agent_cbor_roundtrip(data, len(data), out, len(out), ctypes.byref(n))
    return out.raw[: n.value] if rc == 0 else None


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=values)
def test_c_cbor_decoder_agrees_with_cbor2(fuzzlib: ctypes.CDLL, value: object) -> None:
    encoded = cbor2.dumps(value)
    back = _roundtrip(fuzzlib, encoded)
    assert back is not None
    assert cbor2.loads(back) == value


def test_c_cbor_decoder_rejects_outside_the_subset(fuzzlib: ctypes.CDLL) -> None:
    for bad in (
        b"",
        b"\x18",
        b"\x1c",
        b"\x5f\x41a\xff",
        b"\x9f\xff",
        b"\xc0\x00",
        b"\xfb" + bytes(8),
        b"\x1b\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\x3b\x80" + bytes(7),
        b"\x01\x02",
        b"\x9a\xff\xff\xff\xff",
        b"\x7a\xff\xff\xff\xff",
        b"\xa1\x80\x00",
        b"\xf7",
    ):
        assert _roundtrip(fuzzlib, bad) is None, bad
    assert _roundtrip(fuzzlib, b"\x81" * 33 + b"\x00") is None  # depth limit
    assert _roundtrip(fuzzlib, b"\x81" * 32 + b"\x00") is not None


def test_fuzz_stream_entry_handles_seeds(fuzzlib: ctypes.CDLL) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
    try:
        import fuzz_agent_frame  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    for s in fuzz_agent_frame.seeds():
        assert fuzzlib.agent_fuzz_stream(s, len(s)) >= 0
    blob = b"".join(fuzz_agent_frame.seeds())
    assert fuzzlib.agent_fuzz_stream(blob, len(blob)) >= len(fuzz_agent_frame.seeds()) - 1


def test_short_fuzz_run() -> None:
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / "fuzz_agent_frame.py"), "--seconds", "5"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["crashes"] == 0 and result["runs"] > 100


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=64) | st.text(max_size=32).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_c_utf8_check_agrees_with_python(fuzzlib: ctypes.CDLL, data: bytes) -> None:
    try:
        data.decode("utf-8")
        ok = True
    except UnicodeDecodeError:
        ok = False
    assert fuzzlib.utf8_valid(data, len(data)) == ok
