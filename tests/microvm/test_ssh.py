"""microvm.ssh end to end: Debian's OpenSSH client (ssh, sftp, scp), rsync and tmux
against ``microvm ssh serve`` (loopback TCP and ``ProxyCommand ... --stdio``) and the
in-process client, all on one real guest (busybox + the host's rsync and scp)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

import rootfs
from microvm import Sandbox
from microvm.ssh import SshConfigError, SshServer, authorize, connect, host_key, read_public_key
from microvm.ssh._keys import generate_ed25519
from tests.microvm.sandbox_fixtures import (  # noqa: F401
    add_dynamic_binary,
    busybox_image,
    busybox_tree,
    sandbox_home,
)

NAME = "sshbox"
_MISSING = [p for p in ("ssh", "sftp", "scp", "ssh-keygen", "tmux", "rsync")
            if shutil.which(p) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"needs {_MISSING}")


def _microvm(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "microvm", *args], capture_output=True,
                          text=True, timeout=kw.pop("timeout", 60), **kw)


class Env:
    """The shared sandbox, an authorized client key and an ssh_config for both paths."""

    def __init__(self, sb: Sandbox, tmp: Path, port: int, serve: subprocess.Popen[bytes]
                 ) -> None:
        self.sb, self.tmp, self.port, self.serve = sb, tmp, port, serve
        self.cfg = tmp / "ssh_config"
        self.key = tmp / "id_ed25519"

    def ssh(self, host: str, *args: str, input: bytes | None = None, timeout: float = 60,
            opts: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ssh", "-F", str(self.cfg), *opts, host, *args], input=input,
                              capture_output=True, timeout=timeout)

    def guest_ps(self) -> str:
        return self.sb.exec("/bin/ps", ["-o", "pid,args"]).stdout_text


@pytest.fixture(scope="module")
def env(sandbox_home: Path,  # noqa: F811
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("ssh")
    root = busybox_tree(tmp / "root")
    add_dynamic_binary(root, "/usr/bin/rsync")
    add_dynamic_binary(root, "/usr/bin/scp")
    img = busybox_image(rootfs.ImageStore(), "local/sshbox:1", tree=root,
                        config={"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]})
    sb = Sandbox.create(NAME, image=img, network="none", memory=256)
    serve: subprocess.Popen[bytes] | None = None
    try:
        key = tmp / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, timeout=30)
        r = _microvm("ssh", "authorize", f"{key}.pub")
        assert r.returncode == 0 and "added to" in r.stdout, r.stderr
        with open(tmp / "serve.log", "wb") as log:
            serve = subprocess.Popen([sys.executable, "-m", "microvm", "ssh", "serve", NAME,
                                      "--listen", "127.0.0.1:0"], stdout=log, stderr=log)
        port = 0
        for _ in range(600):
            m = re.search(r"on port (\d+)", (tmp / "serve.log").read_text())
            if m:
                port = int(m.group(1))
                break
            assert serve.poll() is None, (tmp / "serve.log").read_text()
            time.sleep(0.1)
        assert port, (tmp / "serve.log").read_text()
        block = _microvm("ssh", "config", NAME)
        assert block.returncode == 0, block.stderr
        known = sandbox_home / "ssh" / "known_hosts"
        common = (f"    IdentityFile {key}\n    IdentitiesOnly yes\n    BatchMode yes\n"
                  f"    IdentityAgent none\n    GlobalKnownHostsFile /dev/null\n"
                  f"    LogLevel ERROR\n")
        (tmp / "ssh_config").write_text(
            block.stdout + common +
            f"Host loop\n    HostName 127.0.0.1\n    Port {port}\n    User root\n"
            f"    HostKeyAlias microvm\n    UserKnownHostsFile \"{known}\"\n"
            f"    StrictHostKeyChecking yes\n" + common)
        yield Env(sb, tmp, port, serve)
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(20)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait(10)
        sb.stop()
        Sandbox.remove(NAME)


# -- exec ------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["loop", NAME])
def test_exec_exit_status_stdout_stderr(env: Env, host: str) -> None:
    r = env.ssh(host, "echo out; echo err >&2; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"


@pytest.mark.parametrize("host", ["loop", NAME])
def test_stdin_piped_with_eof(env: Env, host: str) -> None:
    data = os.urandom(1 << 20)
    r = env.ssh(host, "sha256sum", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_env_and_signal_exit_status(env: Env) -> None:
    r = env.ssh("loop", 'echo "$MVTEST"', opts=("-o", "SetEnv=MVTEST=from-client"))
    assert r.stdout == b"from-client\n", r.stderr
    r = env.ssh("loop", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM


# -- pty through tmux ---------------------------------------------------------------------------
def test_pty_session_in_tmux_follows_resize(env: Env) -> None:
    sock = f"mvssh{os.getpid()}"
    tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
    subprocess.run([*tmux, "new-session", "-d", "-s", "t", "-x", "100", "-y", "30",
                    f"ssh -F {env.cfg} -t loop"], check=True, timeout=30)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "t"], capture_output=True,
                              text=True, timeout=30).stdout

    def wait_for(pattern: str) -> str:
        for _ in range(300):
            s = screen()
            if re.search(pattern, s):
                return s
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never appeared:\n{s}")

    try:
        wait_for(r"(?m)^/\S* #\s*$")                     # busybox ash's root prompt
        subprocess.run([*tmux, "send-keys", "-t", "t", "stty size", "Enter"], timeout=30)
        wait_for(r"(?m)^30 100\s*$")
        subprocess.run([*tmux, "resize-window", "-t", "t", "-x", "120", "-y", "40"],
                       check=True, timeout=30)
        subprocess.run([*tmux, "send-keys", "-t", "t", "clear; stty size", "Enter"],
                       timeout=30)
        wait_for(r"(?m)^40 120\s*$")
        subprocess.run([*tmux, "send-keys", "-t", "t", "exit", "Enter"], timeout=30)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=30)


# -- sftp, scp, rsync ------------------------------------------------------------------------
def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def test_sftp_20mb_put_get_sha256_bounded_memory(env: Env) -> None:
    src = env.tmp / "big.bin"
    with open(src, "wb") as f:
        for _ in range(20):
            f.write(os.urandom(1 << 20))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    back = env.tmp / "big.back"
    batch = env.tmp / "batch"
    batch.write_text(f"put {src} /tmp/big.bin\nget /tmp/big.bin {back}\n")
    pid = env.serve.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")     # reset the peak (VmHWM)
    before = _status(pid)["VmRSS"]
    r = subprocess.run(["sftp", "-F", str(env.cfg), "-b", str(batch), "loop"],
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak = _status(pid)["VmHWM"]
    assert hashlib.sha256(back.read_bytes()).hexdigest() == want
    assert env.sb.exec("/bin/sha256sum", ["/tmp/big.bin"]).stdout_text.split()[0] == want
    grown = peak - before
    print(f"serve peak growth: {grown / (1 << 20):.1f} MiB")
    # windows, queues and paramiko's 2 MiB channel window: a few MiB, never the file (a
    # server holding it would grow by 20 MiB or more, usually twice that)
    assert grown < 16 * 1024 * 1024, f"serve grew by {grown >> 20} MiB for a 20 MiB file"
    env.sb.fs.remove("/tmp/big.bin")


def test_sftp_metadata_ops(env: Env) -> None:
    with connect(env.sb) as ssh:
        sftp = ssh.sftp()
        sftp.mkdir("/tmp/m", 0o750)
        with sftp.open("/tmp/m/a", "w") as f:
            f.write(b"hello world")
        with sftp.open("/tmp/m/a", "r+") as f:        # a write in the middle (dd path)
            f.seek(6)
            f.write(b"WORLD")
        assert env.sb.fs.read("/tmp/m/a") == b"hello WORLD"
        sftp.symlink("/tmp/m/a", "/tmp/m/l")
        assert sftp.readlink("/tmp/m/l") == "/tmp/m/a"
        assert sftp.lstat("/tmp/m/l").st_mode & 0o170000 == 0o120000
        sftp.chmod("/tmp/m/a", 0o600)
        sftp.truncate("/tmp/m/a", 5)
        sftp.utime("/tmp/m/a", (1_000_000_000, 1_000_000_000))
        st = sftp.stat("/tmp/m/a")
        assert (st.st_mode & 0o7777, st.st_mtime, st.st_size) == (0o600, 1_000_000_000, 5)
        sftp.rename("/tmp/m/a", "/tmp/m/b")
        assert sorted(sftp.listdir("/tmp/m")) == ["b", "l"]
        with pytest.raises(FileNotFoundError):
            sftp.stat("/tmp/m/nope")
        with pytest.raises(OSError):
            sftp.rmdir("/tmp/m")                      # not empty
        sftp.remove("/tmp/m/b")
        sftp.remove("/tmp/m/l")
        sftp.rmdir("/tmp/m")
        assert not env.sb.fs.exists("/tmp/m")
        assert sftp.normalize(".") == "/"


def test_scp_both_ways(env: Env) -> None:
    src = env.tmp / "scp.bin"
    src.write_bytes(os.urandom(300_000))
    back = env.tmp / "scp.back"
    for mode in ((), ("-O",)):                   # SFTP mode, then legacy scp via the guest's
        back.unlink(missing_ok=True)
        r = subprocess.run(["scp", "-F", str(env.cfg), *mode, str(src), "loop:/tmp/s.bin"],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["scp", "-F", str(env.cfg), *mode, "loop:/tmp/s.bin", str(back)],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert back.read_bytes() == src.read_bytes()
    env.sb.fs.rename("/usr/bin/scp", "/usr/bin/scp.off")
    try:
        r = subprocess.run(["scp", "-F", str(env.cfg), "-O", str(src), "loop:/tmp/s2.bin"],
                           capture_output=True, timeout=60)
        assert r.returncode != 0
        assert b"image has no scp program" in r.stderr
    finally:
        env.sb.fs.rename("/usr/bin/scp.off", "/usr/bin/scp")


def test_rsync_tree_over_ssh(env: Env) -> None:
    tree = env.tmp / "tree"
    for i in range(30):
        p = tree / f"d{i % 4}" / f"f{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(1000 + 997 * i))
    (tree / "d0" / "link").symlink_to("f0.txt")
    e = f"ssh -F {env.cfg}"
    r = subprocess.run(["rsync", "-a", "-e", e, f"{tree}/", f"{NAME}:/tmp/tree/"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    back = env.tmp / "tree.back"
    r = subprocess.run(["rsync", "-a", "-e", e, "loop:/tmp/tree/", f"{back}/"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    def listing(d: Path) -> dict[str, bytes | str]:
        return {str(p.relative_to(d)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
                for p in sorted(d.rglob("*")) if p.is_symlink() or p.is_file()}
    assert listing(back) == listing(tree)
    env.sb.fs.remove("/tmp/tree", recursive=True)


# -- authentication ---------------------------------------------------------------------------
def test_password_auth_refused(env: Env) -> None:
    r = env.ssh("loop", "true", opts=("-o", "PreferredAuthentications=password,"
                                      "keyboard-interactive", "-o", "PubkeyAuthentication=no"))
    assert r.returncode == 255
    assert b"Permission denied (publickey)" in r.stderr


def test_unknown_key_refused(env: Env) -> None:
    other = env.tmp / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True, timeout=30)
    cfg = env.tmp / "other_config"
    cfg.write_text(env.cfg.read_text().replace(f"IdentityFile {env.key}\n",
                                               f"IdentityFile {other}\n"))
    r = subprocess.run(["ssh", "-F", str(cfg), "loop", "true"], capture_output=True, timeout=60)
    assert r.returncode == 255
    assert b"Permission denied (publickey)" in r.stderr


# -- lifetime ----------------------------------------------------------------------------------
def test_idle_timeout_closes_the_session(env: Env) -> None:
    server = SshServer(env.sb, idle_timeout=1.5)
    t = threading.Thread(target=server.serve_tcp, args=("127.0.0.1", 0), daemon=True)
    t.start()
    try:
        for _ in range(100):
            if server.port:
                break
            time.sleep(0.05)
        r = env.ssh("loop", "sleep 419", opts=("-p", str(server.port)), timeout=60)
        assert r.returncode == 255            # the connection was closed under it
        _wait_gone(env, "sleep 419")
    finally:
        server.close()
        t.join(10)


def _wait_gone(env: Env, marker: str) -> None:
    for _ in range(200):
        if marker not in env.guest_ps():
            return
        time.sleep(0.1)
    raise AssertionError(f"{marker!r} still runs in the guest:\n{env.guest_ps()}")


def test_twenty_concurrent_sessions(env: Env) -> None:
    procs = [subprocess.Popen(["ssh", "-F", str(env.cfg), "loop", f"sleep 1; echo n{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(20)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 20, [o[1] for o in outs]
    assert [o[0] for o in outs] == [f"n{i}\n".encode() for i in range(20)]


def test_killed_client_leaves_no_guest_processes(env: Env) -> None:
    p = subprocess.Popen(["ssh", "-F", str(env.cfg), "loop", "sleep 417 & sleep 418; wait"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            ps = env.guest_ps()
            if "sleep 417" in ps and "sleep 418" in ps:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the session never started:\n{env.guest_ps()}")
    finally:
        p.kill()
        p.wait(10)
    _wait_gone(env, "sleep 417")
    _wait_gone(env, "sleep 418")


# -- in-process client -----------------------------------------------------------------------
def test_in_process_client_exec_shell_sftp_signal(env: Env) -> None:
    with env.sb.ssh() as ssh:
        assert isinstance(ssh, paramiko.SSHClient)
        assert ssh.exec("echo hi; echo oops >&2; exit 4") == (4, b"hi\n", b"oops\n")
        assert ssh.exec("cat", stdin=b"abc") == (0, b"abc", b"")
        assert ssh.exec('echo "$X"', env={"X": "y"})[1] == b"y\n"
        sftp = ssh.sftp()
        with sftp.open("/tmp/inproc.txt", "w") as f:
            f.write(b"payload")
        assert env.sb.fs.read("/tmp/inproc.txt") == b"payload"
        sftp.remove("/tmp/inproc.txt")
        ch = ssh.shell(rows=20, cols=70)
        ch.send(b"stty size; exit\n")
        got = b""
        while not ch.exit_status_ready() or ch.recv_ready():
            piece = ch.recv(4096)
            if not piece:
                break
            got += piece
        assert b"20 70" in got
        # a "signal" channel request reaches the process group
        chan = ssh.get_transport().open_session()
        chan.exec_command("trap 'echo got-term; exit 9' TERM; echo ready; "
                          "while :; do sleep 0.1; done")
        assert chan.recv(100) == b"ready\n"
        m = paramiko.Message()
        m.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
        m.add_int(chan.remote_chanid)
        m.add_string("signal")
        m.add_boolean(False)
        m.add_string("TERM")
        chan.transport._send_user_message(m)
        assert chan.recv_exit_status() == 9
        assert b"got-term" in chan.recv(100)
        # direct-tcpip: refused by this sandbox's policy (network="none": no ingress)
        with pytest.raises(paramiko.ChannelException):
            ssh.get_transport().open_channel("direct-tcpip", ("127.0.0.1", 80),
                                             ("127.0.0.1", 40000))


def test_direct_tcpip_follows_the_ingress_policy(env: Env) -> None:
    from netstack import NetworkPolicy

    with connect(NAME) as ssh:           # its own handle: the policy below stays local
        assert ssh._server is not None
        ssh._server.sandbox.network.policy = NetworkPolicy.coerce(
            {"default_egress": "deny", "default_ingress": "deny", "rules": [
                {"action": "allow", "direction": "ingress", "protocol": "tcp", "port": 7000}]})
        listener = ssh.get_transport().open_session()
        listener.exec_command("echo hello-fwd | nc -l -p 7000")
        t = ssh.get_transport()
        for _ in range(100):
            ch = t.open_channel("direct-tcpip", ("127.0.0.1", 7000), ("127.0.0.1", 40000))
            got = ch.recv(100)
            if got:
                break
            ch.close()                     # nc was not listening yet
            time.sleep(0.1)
        assert got == b"hello-fwd\n"
        ch.close()
        with pytest.raises(paramiko.ChannelException):    # a port the policy denies
            t.open_channel("direct-tcpip", ("127.0.0.1", 7001), ("127.0.0.1", 40000))
        with pytest.raises(paramiko.ChannelException):    # not the guest's own loopback
            t.open_channel("direct-tcpip", ("192.0.2.1", 7000), ("127.0.0.1", 40000))
        listener.close()


def test_cli_one_command_and_bad_input(env: Env) -> None:
    r = _microvm("ssh", NAME, "echo", "via-cli;", "exit", "5")
    assert (r.returncode, r.stdout) == (5, "via-cli\n"), r.stderr
    r = _microvm("ssh", "serve", NAME, "--listen", "localhost:99999")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "99999" in r.stderr
    r = _microvm("ssh", "serve", NAME, "--listen", "127.0.0.1:1", "--stdio")
    assert r.returncode == 2 and "exclude" in r.stderr
    r = _microvm("ssh", "authorize", str(env.key))               # the private key
    assert r.returncode == 2 and "private key" in r.stderr
    r = _microvm("ssh", "serve", "no-such-box", "--stdio")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no-such-box" in r.stderr


# -- keys (no guest) ---------------------------------------------------------------------------
def test_host_key_created_once_0600(tmp_path: Path) -> None:
    p = tmp_path / "hk"
    a = host_key(p)
    assert p.stat().st_mode & 0o777 == 0o600
    assert host_key(p).asbytes() == a.asbytes()
    assert a.get_name() == "ssh-ed25519"
    assert [x.name for x in tmp_path.iterdir()] == ["hk"]      # no temp files left


def test_bad_keys_and_arguments_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(SshConfigError, match="TYPE BASE64"):
        read_public_key("garbage")
    with pytest.raises(SshConfigError, match="bad public key"):
        read_public_key("ssh-ed25519 !!!notbase64")
    with pytest.raises(SshConfigError, match="does not exist"):
        authorize(tmp_path / "missing.pub", authorized_keys=tmp_path / "ak")
    k = generate_ed25519()
    pub = tmp_path / "k.pub"
    pub.write_text(f"{k.get_name()} {k.get_base64()} me\n")
    assert authorize(pub, authorized_keys=tmp_path / "ak") is True
    assert authorize(pub, authorized_keys=tmp_path / "ak") is False
    assert (tmp_path / "ak").stat().st_mode & 0o777 == 0o600
    with pytest.raises(SshConfigError, match="idle_timeout"):
        SshServer("x", host_key=k, authorized_keys=[k], idle_timeout=-1)

