"""The docker-like ``microvm`` command against real guests, driven as a user would.

Every call is the real CLI in a subprocess (``sys.executable -m microvm``) with the
module's private ``$MICROVM_HOME``. One detached sandbox (``cliweb1``: a read-only and a
writable bind volume, a published port, custom ``--net-rule`` policy, a ``--secret``, a
label) is shared by most tests; ``run --rm`` and the ``-it`` session boot their own.
The teardown proves nothing is left (processes, network objects, records, files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import rootfs
from tests.microvm.sandbox_fixtures import (  # noqa: F401
    busybox_image,
    microvm_cli,
    sandbox_home_fixture,
)

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(300)]

IMG = "local/busybox:1"
WEB = "cliweb1"


def cli(*argv: str, stdin: bytes | None = None, timeout: float = 120,
        check: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``microvm ARGV``; with ``check``, assert that exit status (stderr shown if not)."""
    return microvm_cli(*argv, stdin=stdin, timeout=timeout, check=check)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def home(sandbox_home: Path) -> Path:
    busybox_image(rootfs.ImageStore())
    return sandbox_home


@pytest.fixture(scope="module")
def web(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    ro = tmp_path_factory.mktemp("ro")
    (ro / "index.html").write_text("hello from the host\n")
    rw = tmp_path_factory.mktemp("rw")
    port = _free_port()
    r = cli("run", "-d", "--name", WEB, "-v", f"{ro}:/data:ro", "-v", f"{rw}:/rw",
            "-p", f"127.0.0.1:{port}:80", "--label", "team=cli", "-e", "GREETING=hi",
            "--net-rule", "allow@dns", "--net-rule", "allow@203.0.113.0/24:tcp:443",
            "--net-rule", "allow@api.example.com:tcp:443",
            "--secret", "TOKEN=s3cret-value@api.example.com",
            IMG, "httpd", "-f", "-p", "80", "-h", "/data", check=0)
    assert r.stdout.decode().strip() == WEB
    yield {"ro": ro, "rw": rw, "port": port}
    cli("rm", "-f", WEB)


def test_run_rm_streams_output_and_exits_with_the_commands_status(home: Path) -> None:
    r = cli("run", "--rm", "--name", "clirun1", "--net", "none", "-e", "A=1",
            IMG, "sh", "-c", "echo out $A; echo err >&2; exit 3", check=3)
    assert r.stdout == b"out 1\n" and r.stderr == b"err\n"
    assert "clirun1" not in cli("ls", "-a", "-q", check=0).stdout.decode().split()


def test_flags_after_image_belong_to_the_command_with_a_hint(home: Path) -> None:
    r = cli("run", "--rm", "--name", "clirun2", "--net", "none", IMG, "-v", "x:y", check=127)
    line = r.stderr.decode().strip()
    assert len(line.splitlines()) == 1 and "flags go before IMAGE" in line, line
    assert "clirun2" not in cli("ls", "-a", "-q", check=0).stdout.decode().split()


def test_exec_exit_codes_126_127_and_n(web: dict[str, object]) -> None:
    cli("exec", WEB, "sh", "-c", "exit 7", check=7)
    r = cli("exec", WEB, "no-such-command", check=127)
    assert "not found in the guest" in r.stderr.decode()
    r = cli("exec", WEB, "/data/index.html", check=126)
    assert "cannot be run" in r.stderr.decode()
    r = cli("exec", "ghost-sandbox", "true", check=125)
    assert len(r.stderr.splitlines()) == 1 and b"ghost-sandbox" in r.stderr


def test_env_workdir_user(web: dict[str, object]) -> None:
    r = cli("exec", "-e", "EXTRA=2", "-w", "/tmp", "-u", "65534", WEB, "sh", "-c",
            "echo $GREETING $EXTRA $(pwd) $(id -u)", check=0)
    assert r.stdout == b"hi 2 /tmp 65534\n"


def test_stdin_with_i_is_binary_safe_and_delivers_eof(web: dict[str, object]) -> None:
    blob = bytes(range(256)) * 4096 + os.urandom(100_000)        # ~1.1 MB, every byte value
    r = cli("exec", "-i", WEB, "sh", "-c", "cat > /rw/blob; wc -c < /rw/blob", stdin=blob,
            check=0)
    assert int(r.stdout) == len(blob)
    assert (Path(str(web["rw"])) / "blob").read_bytes() == blob   # through the bind volume
    r = cli("exec", "-i", WEB, "md5sum", stdin=blob, check=0)
    assert r.stdout.split()[0].decode() == hashlib.md5(blob).hexdigest()
    # without -i the command's stdin is empty
    r = cli("exec", WEB, "wc", "-c", stdin=b"ignored", check=0)
    assert r.stdout.strip() == b"0"


def test_volumes_readonly_enforced_and_writable(web: dict[str, object]) -> None:
    r = cli("exec", WEB, "sh", "-c", "echo x > /data/new", check=1)
    assert b"Read-only file system" in r.stderr
    cli("exec", WEB, "sh", "-c", "echo from-guest > /rw/out", check=0)
    assert (Path(str(web["rw"])) / "out").read_text() == "from-guest\n"


def test_published_port_reaches_the_server_in_the_guest(web: dict[str, object]) -> None:
    url = f"http://127.0.0.1:{web['port']}/index.html"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.read() == b"hello from the host\n"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_secret_is_a_placeholder_in_the_guest(web: dict[str, object]) -> None:
    out = cli("exec", WEB, "sh", "-c", "echo $TOKEN", check=0).stdout.decode().strip()
    assert out and "s3cret-value" not in out


def test_ls_filters_and_json(web: dict[str, object]) -> None:
    rows = json.loads(cli("ls", "--format", "json", "--filter", "label=team=cli",
                          check=0).stdout)
    assert [r["name"] for r in rows] == [WEB] and rows[0]["state"] == "running"
    assert json.loads(cli("ps", "--format", "json", "--filter", "label=team=other",
                          check=0).stdout) == []
    table = cli("ls", check=0).stdout.decode()
    assert table.splitlines()[0].split()[:2] == ["NAME", "STATE"] and WEB in table


def test_inspect_net_explain_counters_logs_stats(web: dict[str, object]) -> None:
    doc = json.loads(cli("inspect", WEB, check=0).stdout)
    assert doc["state"] == "running" and doc["labels"] == {"team": "cli"}
    assert doc["network"]["published"] == {"tcp:80": web["port"]}
    assert doc["network"]["guest_ipv4"]
    assert doc["config"]["env"] == {"GREETING": "hi"}
    assert "s3cret-value" not in json.dumps(doc)
    allowed = cli("net", "explain", WEB, "--to", "203.0.113.9:443", check=0).stdout.decode()
    denied = cli("net", "explain", WEB, "--to", "198.51.100.1:443", check=0).stdout.decode()
    assert "allow" in allowed.split()[0:3] or allowed.startswith("allow"), allowed
    assert "deny" in denied, denied
    counters = json.loads(cli("net", "counters", WEB, check=0).stdout)
    assert len(counters["rules"]) >= 3 and "gateway" in counters
    assert cli("logs", "--tail", "5", WEB, check=0).stdout
    assert "uptime_ms" in json.loads(cli("stats", WEB, check=0).stdout)


def test_cp_both_ways(web: dict[str, object], tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    cli("cp", str(src), f"{WEB}:/tmp/", check=0)
    assert cli("exec", WEB, "cat", "/tmp/tree/a.txt", check=0).stdout == b"A\n"
    back = tmp_path / "back"
    back.mkdir()
    cli("cp", f"{WEB}:/tmp/tree", str(back), check=0)
    assert (back / "tree" / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()


def test_stop_start_rm(home: Path) -> None:
    cli("create", "--name", "clilife", "--net", "none", IMG, check=0)
    cli("stop", "-t", "5", "clilife", check=0)
    rows = json.loads(cli("ls", "-a", "--format", "json", "--filter", "name=clilife",
                          check=0).stdout)
    assert rows[0]["state"] == "stopped"
    cli("start", "clilife", check=0)
    assert cli("exec", "clilife", "echo", "back", check=0).stdout == b"back\n"
    r = cli("rm", "clilife", check=125)          # running: needs -f
    assert b"rm -f" in r.stderr
    cli("kill", "clilife", check=0)
    cli("rm", "clilife", check=0)
    assert cli("ls", "-a", "-q", check=0).stdout.decode().split().count("clilife") == 0


def test_version_and_help_examples() -> None:
    r = cli("--version", check=0)
    assert r.stdout.decode().startswith("microvm ")
    for cmd in (["run"], ["exec"], ["image", "ls"], ["net", "explain"], ["doctor"]):
        assert cli(*cmd, "--version", check=0).stdout == r.stdout
    for name in ("run", "create", "exec", "ls", "cp", "attach", "net"):
        h = cli(name, "--help", check=0).stdout.decode()
        assert "microvm " in h.split("Example", 1)[-1], name


def test_every_command_has_an_example_version_and_flag_help() -> None:
    """Every command and subcommand (the lazy group loads them all): an example in its
    --help, --version, and help text on every flag."""
    import click

    from microvm.cli import cli as group

    def walk(cmd: click.Command, path: list[str], ctx: click.Context) -> list[str]:
        bad = []
        if isinstance(cmd, click.Group):
            for n in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, n)
                assert sub is not None
                bad += walk(sub, [*path, n], click.Context(sub, info_name=n, parent=ctx))
        h = cmd.get_help(ctx)
        if "microvm " not in h.split("Example", 1)[-1] or "Example" not in h:
            bad.append(f"{' '.join(path)}: no example")
        if not any(p.name == "version" for p in cmd.params):
            bad.append(f"{' '.join(path)}: no --version")
        bad += [f"{' '.join(path)}: {'/'.join(p.opts)} has no help" for p in cmd.params
                if isinstance(p, click.Option) and not p.help]
        return bad

    assert walk(group, ["microvm"], click.Context(group, info_name="microvm")) == []


# -- the interactive TTY, through tmux -----------------------------------------------------
#: a tmux server of this module's own (another test's `tmux kill-server` on the default
#: socket ended a session here once: "server exited unexpectedly")
TMUX = ("tmux", "-L", f"microvm-cli-test-{os.getpid()}")


@pytest.fixture(scope="module", autouse=True)
def _private_tmux_server() -> Iterator[None]:
    """The module's tmux server is gone at the end, and its socket file too."""
    yield
    subprocess.run([*TMUX, "kill-server"], capture_output=True)
    tmpdir = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
    (tmpdir / TMUX[2]).unlink(missing_ok=True)


class Tmux:
    """A detached tmux session running one command; keys in, screen out."""

    def __init__(self, name: str, command: str) -> None:
        self.name = name
        subprocess.run([*TMUX, "new-session", "-d", "-s", name, "-x", "100", "-y", "30",
                        command], check=True, env=dict(os.environ))

    def keys(self, *keys: str) -> None:
        subprocess.run([*TMUX, "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run([*TMUX, "capture-pane", "-p", "-t", self.name], check=True,
                              capture_output=True, text=True).stdout

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            s = self.screen()
            if text in s:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on the screen:\n{s}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run([*TMUX, "kill-session", "-t", self.name], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_interactive_tty_resize_detach_attach(home: Path) -> None:
    base = f"cd {os.getcwd()} && {sys.executable} -m microvm"
    t = Tmux("microvm-cli-it", f"{base} run -it --name clitty1 --net none {IMG} sh; "
                               f"echo RUN-EXITED=$?; sleep 60")
    try:
        t.wait_for("/ #")
        t.keys("stty size", "Enter")
        t.wait_for("30 100")
        subprocess.run([*TMUX, "resize-window", "-t", t.name, "-x", "120", "-y", "40"],
                       check=True)
        time.sleep(0.5)
        t.keys("clear; stty size", "Enter")
        t.wait_for("40 120")
        t.keys("C-]")
        t.wait_for("RUN-EXITED=0")
        assert json.loads(cli("ls", "--format", "json", "--filter", "name=clitty1",
                              check=0).stdout)[0]["state"] == "running"
    finally:
        t.close()
    t = Tmux("microvm-cli-at", f"{base} attach --detach-keys ctrl-p,ctrl-q clitty1; "
                               f"echo ATTACH-EXITED=$?; sleep 60")
    try:
        t.wait_for("/ #")
        t.keys("echo $((6*7))", "Enter")
        t.wait_for("42")
        t.keys("exit 5", "Enter")
        t.wait_for("ATTACH-EXITED=5")
    finally:
        t.close()
    cli("rm", "-f", "clitty1", check=0)


def _read_until(p: subprocess.Popen[bytes], text: bytes, timeout: float = 60) -> bytes:
    """Read ``p``'s stdout until ``text`` appears (the bytes so far)."""
    import select

    assert p.stdout is not None
    got = b""
    deadline = time.monotonic() + timeout
    while text not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} not in {got!r}"
        ready, _, _ = select.select([p.stdout], [], [], left)
        if ready:
            chunk = os.read(p.stdout.fileno(), 65536)
            assert chunk, f"EOF before {text!r}: {got!r}"
            got += chunk
    return got


def test_attach_to_the_main_process_of_run_d(home: Path) -> None:
    """`run -di` starts the main process with a stdin attach writes to; attach shows its output,
    Ctrl-C and the detach keys leave it running, its exit status ends the attach."""
    script = 'echo started; while read x; do echo "got $x"; [ "$x" = quit ] && exit 6; done'
    cli("run", "-di", "--name", "cliattach1", "--net", "none", IMG, "sh", "-c", script, check=0)
    argv = [sys.executable, "-m", "microvm", "attach", "cliattach1"]
    try:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            assert p.stdin is not None
            p.stdin.write(b"one\n")
            p.stdin.flush()
            _read_until(p, b"got one")
            p.send_signal(signal.SIGINT)                  # Ctrl-C leaves, the process runs on
            assert p.wait(timeout=60) == 0
            assert p.stderr is not None and b"detached" in p.stderr.read()
        finally:
            p.kill()
            p.wait()
        r = cli("attach", "cliattach1", stdin=b"\x1d", check=0)   # ctrl-] (default keys)
        assert b"detached" in r.stderr
        r = cli("exec", "cliattach1", "sh", "-c", "ls /run/microvm-main", check=0)
        assert b"exit" not in r.stdout.split()             # still running
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            assert p.stdin is not None
            p.stdin.write(b"quit\n")
            p.stdin.flush()
            assert b"got quit" in _read_until(p, b"got quit")
            assert p.wait(timeout=60) == 6                 # its exit status
        finally:
            p.kill()
            p.wait()
        r = cli("attach", "cliattach1", check=6)
        assert b"has exited (status 6)" in r.stderr
    finally:
        cli("rm", "-f", "cliattach1", check=0)
