"""benchmarks.gateway never leaves its ``gwbench-*`` directory (TLS private keys) behind.

The rig runs in a subprocess with its own ``TMPDIR``: after a normal exit and after
SIGTERM, nothing named ``gwbench-*`` remains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import require_binaries, require_root

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from benchmarks.gateway import bench_rig
    with bench_rig():
        print("up", flush=True)
        if sys.argv[1] == "wait":
            time.sleep(600)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_gateway_bench_rig_removes_its_keys(tmp_path: Path, how: str) -> None:
    require_root()
    require_binaries("ip", "nft", "iperf3", "ss")
    temp = tmp_path / "t"
    temp.mkdir()
    errors = []
    for _attempt in range(3):  # the rig's fixed names can collide with another run on the host
        p = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, "wait" if how == "sigterm" else "exit"],
            cwd=ROOT, env={**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert p.stdout is not None
            up = p.stdout.readline() == b"up\n"
            if up:
                assert len(list(temp.glob("gwbench-*/key.pem"))) == 1 or how == "exit"
                if how == "sigterm":
                    p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=120)
        finally:
            p.kill()
            p.wait()
        # up or not (a failed setup unwinds through the same finally), no key survives
        assert not list(temp.glob("gwbench-*")), err
        if up:
            assert p.returncode == (128 + signal.SIGTERM if how == "sigterm" else 0), err
            return
        errors.append(err.decode(errors="replace")[-500:])
    pytest.fail("the gateway bench rig never came up:\n" + "\n".join(errors))
