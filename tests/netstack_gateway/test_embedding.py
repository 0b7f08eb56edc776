"""The README's "Embedding netstack" examples run as written, and ``python -m netstack
serve`` beyond them: SIGHUP reloads the policy atomically (a bad file keeps the old
one), ``--pcap`` records, ``--publish`` on passt listens, bad arguments are refused with one line before anything starts, nothing is left
behind (no passt, no socket file, no TAP).

Each ``###`` subsection's ``sh`` and ``python`` blocks run in order in a fresh directory
(shell blocks with bash, Python blocks with this interpreter, ``python`` on ``PATH`` being
this interpreter), with ``LIBKRUN`` pointing at the recording libkrun double.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netstack import NetworkPolicy
from netstack.serve import dns_query_frame, dns_rcode
from tests.microvm.conftest import build_krun_double
from tests.netstack_gateway.dns_server import AuthServer
from tests.support import pids_named, require_binaries, require_root

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = [pytest.mark.timeout(120)]


def sections() -> dict[str, list[tuple[str, str]]]:
    text = README.read_text()
    start = text.index("## Embedding netstack")
    part = text[start:text.index("\n## ", start + 5)]
    out: dict[str, list[tuple[str, str]]] = {}
    for chunk in part.split("\n### ")[1:]:
        title = chunk.splitlines()[0]
        out[title] = [(m.group(1), m.group(2))
                      for m in re.finditer(r"```(python|sh)\n(.*?)```", chunk, re.S)]
    return out


@pytest.fixture
def env(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    double = build_krun_double(tmp_path_factory.mktemp("krun"))
    return dict(os.environ, MICROVM_HOME=str(tmp_path / "home"), LIBKRUN=str(double),
                KRUN_DOUBLE_LOG=str(tmp_path / "krun.jsonl"),
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def run_section(title: str, cwd: Path, env: dict[str, str]) -> str:
    blocks = sections()[title]
    assert blocks, f"no code blocks under '### {title}'"
    before = pids_named("passt")
    out = []
    try:
        for i, (lang, code) in enumerate(blocks):
            argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-c", code]
            r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                               timeout=90)
            assert r.returncode == 0, (f"{title}: block {i} ({lang}) failed ({r.returncode}):"
                                       f"\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n"
                                       f"{r.stderr}")
            out.append(r.stdout)
    finally:
        pidfile = cwd / "serve.pid"
        if pidfile.exists():   # a background serve must have exited with its VMM
            pid = int(pidfile.read_text())
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break
                time.sleep(0.05)
            alive = Path(f"/proc/{pid}").exists() and \
                Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
            if alive:
                os.kill(pid, signal.SIGKILL)
            assert not alive, "serve did not exit when its VMM hung up"
    deadline = time.monotonic() + 5
    while pids_named("passt") - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids_named("passt") - before, "passt left running"
    assert not list(cwd.glob("*.sock")) or all(not p.is_socket() for p in cwd.glob("gw.sock"))
    return "".join(out)


def test_the_guide_has_four_examples() -> None:
    titles = list(sections())
    assert len(titles) == 4 and [t.split()[0] for t in titles] == ["QEMU", "libkrun:", "A",
                                                                    "In-process"], titles


def test_qemu_stream_example(tmp_path: Path, env: dict[str, str]) -> None:
    require_binaries("passt")
    out = run_section("QEMU `-netdev stream` (rootless: passt uplink)", tmp_path, env)
    assert "blocked.test: NXDOMAIN" in out
    assert not (tmp_path / "net.sock").exists()
    guest = json.loads((tmp_path / "guest.json").read_text())
    assert guest["transport"] == "stream" and guest["uplink"] == "passt"
    assert guest["guest"]["ipv4"]["gateway"] and guest["guest"]["mtu"] == 65520


def test_libkrun_example(tmp_path: Path, env: dict[str, str]) -> None:
    require_binaries("passt", "gcc")
    out = run_section("libkrun: unixstream, and unixgram with the VFKT handshake", tmp_path,
                      env)
    assert "unixstream: NXDOMAIN" in out and "unixgram: NXDOMAIN" in out
    calls = [json.loads(line) for line in Path(env["KRUN_DOUBLE_LOG"]).read_text().splitlines()]
    net = [c["args"] for c in calls if c["fn"] == "krun_add_net_unixstream"]
    assert len(net) == 1 and net[0][1] == "gw.sock" and net[0][2] == -1


def test_tap_vmm_example(tmp_path: Path, env: dict[str, str]) -> None:
    require_root()
    require_binaries("ip", "nft", "tc")
    run_section("A TAP-based VMM (Firecracker-style; root)", tmp_path, env)
    r = subprocess.run(["ip", "link", "show", "fc-tap0"], capture_output=True, check=False)
    assert r.returncode != 0, "fc-tap0 left behind"


def test_in_process_example(tmp_path: Path, env: dict[str, str]) -> None:
    out = run_section("In-process frames from Python (research, tests)", tmp_path, env)
    assert "uplink got 54 bytes" in out


def _query(sock: socket.socket, guest: dict[str, object], name: str) -> str:
    frame = dns_query_frame(guest, name)  # type: ignore[arg-type]
    sock.send(frame)
    while True:
        rcode = dns_rcode(sock.recv(65536))
        if rcode is not None:
            return rcode


def test_sighup_reloads_the_policy_pcap_and_published_port(
        tmp_path: Path, env: dict[str, str], auth: AuthServer) -> None:
    require_binaries("passt")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(NetworkPolicy.none().to_dict()))
    gw_path = tmp_path / "gw.sock"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "netstack", "serve", "--socket", str(gw_path), "--policy",
         str(policy), "--uplink", "passt", "--transport", "dgram", "--dns",
         f"127.0.0.1:{auth.port}", "--pcap", str(tmp_path / "trace.pcapng"),
         "--publish", f"{port}:80"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dev = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        info = json.loads(proc.stdout.readline())
        guest = info["guest"]
        assert info["published"] == {"tcp:80": port}
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass   # passt listens on the published port
        dev.bind(str(tmp_path / "vm.sock"))
        dev.connect(str(gw_path))
        dev.settimeout(10)
        dev.send(b"VFKT")
        assert _query(dev, guest, "a.example.test") == "NXDOMAIN"

        def hup_and_wait(expect: str) -> None:
            proc.send_signal(signal.SIGHUP)
            assert proc.stderr is not None
            while True:
                line = proc.stderr.readline()
                assert line, "serve exited"
                if "netstack serve: policy" in line:
                    assert expect in line, line
                    return

        policy.write_text(json.dumps({"default_egress": "deny", "rules": [
            {"action": "allow", "destination": {"domain": "a.example.test"}}]}))
        hup_and_wait("policy reloaded")
        assert _query(dev, guest, "a.example.test") == "NOERROR"
        assert _query(dev, guest, "c1.example.test") == "NXDOMAIN"
        policy.write_text("{not json")
        hup_and_wait("NOT reloaded")
        assert _query(dev, guest, "a.example.test") == "NOERROR"   # the old policy stays
        proc.terminate()
        assert proc.wait(15) == 0
    finally:
        dev.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not gw_path.exists()
    assert (tmp_path / "trace.pcapng").stat().st_size > 100   # the queries, with verdicts


@pytest.mark.parametrize(("args", "message"), [
    (["--transport", "udp"], "--transport must be one of stream, dgram, tap, got 'udp'"),
    (["--uplink", "slirp"], "--uplink must be tap or passt, got 'slirp'"),
    (["--publish", "0:80", "--uplink", "passt"], "--publish needs a fixed host port"),
    (["--publish", "80", "--uplink", "passt"], "published port must be"),
    (["--uplink", "passt"], "cannot read the policy file"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path: Path, env: dict[str, str],
                                               args: list[str], message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "netstack", "serve", "--socket",
                        str(tmp_path / "s.sock"), "--policy", str(tmp_path / "missing.json"),
                        *args], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.sock").exists()
