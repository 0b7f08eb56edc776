"""``microvm doctor`` on this machine and with QEMU hidden from PATH (real subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _doctor(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microvm", "doctor"], capture_output=True,
                          text=True, timeout=120, env=env)


def test_doctor_here_says_sandboxes_can_run() -> None:
    r = _doctor(dict(os.environ))
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    names = [ln.split(":", 1)[0].split(None, 1)[1] for ln in lines[:-1]]
    assert names == ["qemu", "accelerator", "kernel", "guest agent", "virtiofsd",
                     "tap uplink", "passt", "MICROVM_HOME"]
    assert r.returncode == 0, r.stdout
    assert lines[-1] == "sandboxes can run here"
    accel = next(ln for ln in lines if "accelerator:" in ln)
    # /dev/kvm that cannot run a guest is detected (and TCG named), never a boot hang
    assert "KVM" in accel or "TCG" in accel


def test_doctor_without_qemu_fails_with_a_fix(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}
    env.pop("MICROVM_QEMU", None)
    r = _doctor(env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    qemu = next(ln for ln in r.stdout.splitlines() if ln.split()[1] == "qemu:")
    assert qemu.startswith("FAIL") and "fix: apt-get install qemu-system-x86" in qemu
    assert r.stdout.splitlines()[-1].startswith("sandboxes cannot run here: qemu")


def test_doctor_reports_a_full_or_bad_home(tmp_path: Path) -> None:
    afile = tmp_path / "f"
    afile.write_text("x")
    r = _doctor({**os.environ, "MICROVM_HOME": str(afile / "home")})
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr
    assert "MICROVM_HOME" in r.stdout + r.stderr
