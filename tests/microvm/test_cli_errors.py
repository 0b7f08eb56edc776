"""The ``microvm`` command on bad input: one line on stderr, a fixed exit status, nothing started.

Every row runs the real CLI as a subprocess (``sys.executable -m microvm``) with its
own ``TMPDIR``: no traceback, exactly one stderr line naming the bad value, and no
``microvm-run-*`` directory (nothing was built or booted).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from microvm.backends import QemuBackend
from microvm.backends._qemu import kvm_probe

USAGE, FAILED, VM = 2, 1, 125

# (id, argv, extra env, exit status, text the one stderr line must contain)
# "{R}" is an empty rootfs directory, "{F}" a regular file; both under tmp_path.
CASES: list[tuple[str, list[str], dict[str, str], int, str]] = [
    ("timeout-negative", ["vm", "run", "--rootfs-dir", "{R}", "--timeout", "-1", "--", "/bin/true"], {}, USAGE, "--timeout"),
    ("timeout-zero", ["vm", "run", "--rootfs-dir", "{R}", "--timeout", "0", "--", "/bin/true"], {}, USAGE, "--timeout"),
    ("timeout-word", ["vm", "run", "--rootfs-dir", "{R}", "--timeout", "soon", "--", "/bin/true"], {}, USAGE, "soon"),
    ("boot-timeout-negative", ["vm", "run", "--rootfs-dir", "{R}", "--boot-timeout", "-5", "--", "/bin/true"], {}, USAGE, "--boot-timeout"),
    ("boot-timeout-nan", ["vm", "run", "--rootfs-dir", "{R}", "--boot-timeout", "nan", "--", "/bin/true"], {}, USAGE, "--boot-timeout"),
    ("cpus-zero", ["vm", "run", "--rootfs-dir", "{R}", "--cpus", "0", "--", "/bin/true"], {}, USAGE, "--cpus"),
    ("cpus-too-many", ["vm", "run", "--rootfs-dir", "{R}", "--cpus", "33", "--", "/bin/true"], {}, USAGE, "--cpus"),
    ("memory-small", ["vm", "run", "--rootfs-dir", "{R}", "--memory", "10", "--", "/bin/true"], {}, USAGE, "--memory"),
    ("memory-word", ["vm", "run", "--rootfs-dir", "{R}", "--memory", "lots", "--", "/bin/true"], {}, USAGE, "lots"),
    ("backend-unknown", ["vm", "run", "--rootfs-dir", "{R}", "--backend", "xen", "--", "/bin/true"], {}, USAGE, "xen"),
    ("env-no-equals", ["vm", "run", "--rootfs-dir", "{R}", "--env", "NOVALUE", "--", "/bin/true"], {}, USAGE, "NOVALUE"),
    ("env-no-name", ["vm", "run", "--rootfs-dir", "{R}", "--env", "=v", "--", "/bin/true"], {}, USAGE, "'=v'"),
    ("workdir-relative", ["vm", "run", "--rootfs-dir", "{R}", "--workdir", "tmp", "--", "/bin/true"], {}, USAGE, "'tmp'"),
    ("volume-no-guest-path", ["vm", "run", "--rootfs-dir", "{R}", "--volume", "{R}", "--", "/bin/true"], {}, USAGE, "--volume"),
    ("volume-missing-host-dir", ["vm", "run", "--rootfs-dir", "{R}", "--volume", "/nonexistent:/d", "--", "/bin/true"], {}, USAGE, "/nonexistent"),
    ("volume-relative-guest", ["vm", "run", "--rootfs-dir", "{R}", "--volume", "{R}:data", "--", "/bin/true"], {}, USAGE, "'data'"),
    ("volume-bad-mode", ["vm", "run", "--rootfs-dir", "{R}", "--volume", "{R}:/d:rx", "--", "/bin/true"], {}, USAGE, "--volume"),
    ("rootfs-missing", ["vm", "run", "--rootfs-dir", "/nonexistent", "--", "/bin/true"], {}, USAGE, "/nonexistent"),
    ("rootfs-is-file", ["vm", "run", "--rootfs-dir", "{F}", "--", "/bin/true"], {}, USAGE, "--rootfs-dir"),
    ("rootfs-not-given", ["vm", "run", "--", "/bin/true"], {}, USAGE, "--rootfs-dir"),
    ("cmd-missing", ["vm", "run", "--rootfs-dir", "{R}"], {}, USAGE, "CMD"),
    ("unknown-command", ["frobnicate"], {}, USAGE, "frobnicate"),
    ("unknown-option", ["vm", "run", "--rootfs-dir", "{R}", "--turbo"], {}, USAGE, "--turbo"),
    ("accel-bogus", ["vm", "run", "--rootfs-dir", "{R}", "--", "/bin/true"], {"MICROVM_ACCEL": "bogus"}, USAGE, "MICROVM_ACCEL='bogus'"),
    ("kernel-env-missing", ["vm", "run", "--rootfs-dir", "{R}", "--", "/bin/true"], {"MICROVM_KERNEL": "/nonexistent/k.elf"}, USAGE, "MICROVM_KERNEL"),
    ("kernel-path-env-missing", ["kernel", "path"], {"MICROVM_KERNEL": "/nonexistent/k.elf"}, USAGE, "MICROVM_KERNEL"),
    ("qemu-missing", ["vm", "run", "--rootfs-dir", "{R}", "--", "/bin/true"], {"MICROVM_QEMU": "/nonexistent/qemu"}, VM, "BackendUnavailable"),
    ("libkrun-missing", ["vm", "run", "--rootfs-dir", "{R}", "--backend", "libkrun", "--", "/bin/true"], {"MICROVM_LIBKRUN": "/nonexistent/libkrun.so.1"}, VM, "BackendUnavailable"),
    ("fetch-dest-proc", ["kernel", "fetch", "--dest", "/proc/x"], {}, USAGE, "'/proc/x'"),
    ("fetch-dest-under-file", ["kernel", "fetch", "--dest", "{F}/k"], {}, USAGE, "/k'"),
    ("fetch-source-bogus", ["kernel", "fetch", "--source", "ftp"], {}, USAGE, "'ftp'"),
    ("home-is-file-fetch", ["kernel", "fetch"], {"MICROVM_HOME": "{F}"}, USAGE, "MICROVM_HOME="),
    ("home-is-file-path", ["kernel", "path"], {"MICROVM_HOME": "{F}"}, USAGE, "MICROVM_HOME="),
    ("home-under-file-run", ["vm", "run", "--rootfs-dir", "{R}", "--", "/bin/true"], {"MICROVM_HOME": "{F}/home"}, USAGE, "is a file"),
    # the docker-like commands (microvm run/exec/...): bad flags exit 2, our failures 125
    ("run-memory-word", ["run", "-m", "lots", "img"], {}, USAGE, "'lots'"),
    ("run-memory-huge", ["run", "-m", "900g", "img"], {}, USAGE, "'900g'"),
    ("run-env-bad", ["run", "-e", "=v", "img"], {}, USAGE, "'=v'"),
    ("run-volume-bad", ["run", "-v", "onlyone", "img"], {}, USAGE, "'onlyone'"),
    ("run-publish-ip", ["run", "-p", "0.0.0.0:80:80", "img"], {}, USAGE, "127.0.0.1"),
    ("run-secret-bad", ["run", "--secret", "TOKEN=x", "img"], {}, USAGE, "'TOKEN=x'"),
    ("run-patch-bad", ["run", "--patch", "frob:/x", "img"], {}, USAGE, "'frob:/x'"),
    ("run-detach-keys-bad", ["run", "--detach-keys", "ctrl-ä", "img"], {}, USAGE, "--detach-keys"),
    ("run-pull-bad", ["run", "--pull", "sometimes", "img"], {}, USAGE, "'sometimes'"),
    ("run-net-and-rule", ["run", "--net", "none", "--net-rule", "allow@dns", "img"], {}, USAGE, "--net PRESET"),
    ("rule-icmp-ports", ["run", "--net-rule", "allow@any:icmpv4:80", "img"], {}, USAGE, "ICMP has no ports"),
    ("rule-icmp-ingress", ["run", "--net-rule", "allow:ingress@any:icmpv4", "img"], {}, USAGE, "egress-only"),
    ("rule-brackets-v4", ["run", "--net-rule", "allow@[192.0.2.1]", "img"], {}, USAGE, "brackets go only around IPv6"),
    ("rule-v6-unbracketed", ["run", "--net-rule", "allow@2001:db8::1", "img"], {}, USAGE, "in brackets"),
    ("rule-bare-tld", ["run", "--net-rule", "allow@*.com", "img"], {}, USAGE, "bare top-level domain"),
    ("rule-suffix-tld", ["run", "--net-rule", "allow@suffix=org", "img"], {}, USAGE, "bare top-level domain"),
    ("rule-port-no-proto", ["run", "--net-rule", "allow@example.com:443", "img"], {}, USAGE, "example.com:tcp:443"),
    ("rule-bare-word", ["run", "--net-rule", "allow@publc", "img"], {}, USAGE, "did you mean 'public'"),
    ("rule-dns-port", ["run", "--net-rule", "allow@dns:tcp:54", "img"], {}, USAGE, "port 53 only"),
    ("rule-no-at", ["run", "--net-rule", "allow", "img"], {}, USAGE, "no '@'"),
    ("rule-bad-action", ["run", "--net-rule", "permit@any", "img"], {}, USAGE, "'permit'"),
    ("rule-bad-port", ["run", "--net-rule", "allow@any:tcp:99999", "img"], {}, USAGE, "99999"),
    ("run-bad-name", ["run", "--name", "-x-", "--net", "none", "img"], {"MICROVM_HOME": "{R}"}, VM, "bad sandbox name"),
    ("run-max-duration-bad", ["run", "--max-duration", "soon", "--net", "none", "img"], {"MICROVM_HOME": "{R}"}, VM, "'soon'"),
    ("exec-unknown-sandbox", ["exec", "ghost", "true"], {"MICROVM_HOME": "{R}"}, VM, "'ghost'"),
    ("inspect-unknown-sandbox", ["inspect", "ghost"], {"MICROVM_HOME": "{R}"}, VM, "'ghost'"),
    ("stop-unknown-sandbox", ["stop", "ghost"], {"MICROVM_HOME": "{R}"}, VM, "'ghost'"),
    ("ls-bad-filter", ["ls", "--filter", "colour=red"], {"MICROVM_HOME": "{R}"}, USAGE, "'colour=red'"),
    ("cp-two-host-paths", ["cp", "/a", "/b"], {"MICROVM_HOME": "{R}"}, USAGE, "NAME:/path"),
]  # fmt: skip


def _cli(argv: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    temp = tmp_path / "tmpdir"
    temp.mkdir(exist_ok=True)
    full_env = {**os.environ, "TMPDIR": str(temp), **env}
    return subprocess.run(
        [sys.executable, "-m", "microvm", *argv],
        capture_output=True,
        text=True,
        env=full_env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def _check_one_line(r: subprocess.CompletedProcess[str], status: int, needle: str) -> str:
    lines = r.stderr.splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{r.stderr}"
    assert r.returncode == status, (r.returncode, r.stderr)
    assert needle in lines[0], lines[0]
    assert lines[0].startswith("microvm: ")
    return lines[0]


@pytest.mark.parametrize(("argv", "env", "status", "needle"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_one_line(
    argv: list[str], env: dict[str, str], status: int, needle: str, tmp_path: Path
) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")

    def fill(s: str) -> str:
        return s.replace("{R}", str(rootfs)).replace("{F}", str(afile))

    r = _cli([fill(a) for a in argv], {k: fill(v) for k, v in env.items()}, tmp_path)
    _check_one_line(r, status, fill(needle))
    assert r.stdout == ""
    # nothing was built or booted: no run directory, no disk image
    assert not list((tmp_path / "tmpdir").glob("microvm-run-*"))
    assert afile.read_text() == "not a directory\n"


def test_forced_kvm_that_cannot_run_fails_fast(tmp_path: Path) -> None:
    """MICROVM_ACCEL=kvm where /dev/kvm cannot run a guest: one line, 125, before any disk is built.

    Where KVM really works, forcing it is no error: the backend's check passes.
    """
    qemu = QemuBackend().qemu_binary()
    (tmp_path / "rootfs").mkdir()
    home = tmp_path / "home"
    if kvm_probe(qemu).ok:
        os.environ["MICROVM_ACCEL"] = "kvm"
        try:
            QemuBackend().check()
        finally:
            del os.environ["MICROVM_ACCEL"]
        return
    r = _cli(["vm", "run", "--rootfs-dir", str(tmp_path / "rootfs"), "--", "/bin/true"],
             {"MICROVM_ACCEL": "kvm", "MICROVM_HOME": str(home)}, tmp_path)  # fmt: skip
    line = _check_one_line(r, VM, "BackendUnavailable")
    assert "KVM cannot run a guest" in line and "MICROVM_ACCEL=tcg" in line
    assert not list((tmp_path / "tmpdir").glob("microvm-run-*"))
    # the probe's answer is cached under MICROVM_HOME: a second run does not probe again
    assert (home / "cache" / "kvm-probe.json").is_file()


def test_no_arguments_prints_help() -> None:
    r = subprocess.run([sys.executable, "-m", "microvm"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0 and "kernel" in r.stdout and "vm" in r.stdout and r.stderr == ""
