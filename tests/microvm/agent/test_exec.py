"""exec in the host-mode agent: output, exit codes, stdin, tty, signals, timeouts, rlimits, users."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from microvm.agent import AgentError, ExecTimeout, SyncAgentClient
from tests.microvm.agent.conftest import host_agent
from tests.support import require_root


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pids: list[int], seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.02)
    return [p for p in pids if _alive(p)]


def test_echo_and_exit_codes(sync_client: SyncAgentClient) -> None:
    r = sync_client.exec("echo", ["hello", "world"])
    assert (r.exit_code, r.stdout, r.stderr, r.signal) == (0, b"hello world\n", b"", None)
    for code in (1, 3, 255):
        assert sync_client.exec("sh", ["-c", f"exit {code}"]).exit_code == code


def test_stderr_is_separate(sync_client: SyncAgentClient) -> None:
    r = sync_client.exec("sh", ["-c", "echo out; echo err >&2; echo out2"])
    assert r.stdout == b"out\nout2\n"
    assert r.stderr == b"err\n"


def test_killed_by_signal_reports_minus_one(sync_client: SyncAgentClient) -> None:
    r = sync_client.exec("sh", ["-c", "kill -9 $$"])
    assert (r.exit_code, r.signal) == (-1, 9)


def test_env_cwd_and_defaults(sync_client: SyncAgentClient, tmp_path: Path) -> None:
    r = sync_client.exec(
        "sh", ["-c", 'echo "$FOO|$PATH|$(pwd)"'], env={"FOO": "bar baz"}, cwd=str(tmp_path)
    )
    foo, path, cwd = r.stdout.decode().strip().split("|")
    assert foo == "bar baz"
    assert "/usr/bin" in path
    assert cwd == str(tmp_path)


def test_failures_are_typed(sync_client: SyncAgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentError) as e:
        sync_client.exec("/definitely/not/here")
    assert e.value.kind == "not_found"
    assert "/definitely/not/here" in str(e.value)
    with pytest.raises(AgentError) as e:
        sync_client.exec("no-such-command-xyz")
    assert e.value.kind == "not_found"
    with pytest.raises(AgentError) as e:
        sync_client.exec("true", cwd=str(tmp_path / "missing"))
    assert e.value.kind == "bad_cwd"
    noexec = tmp_path / "noexec"
    noexec.write_text("#!/bin/sh\n")
    noexec.chmod(0o644)
    with pytest.raises(AgentError) as e:
        sync_client.exec(str(noexec))
    assert e.value.kind == "permission_denied"
    with pytest.raises(ValueError, match="rlimit"):
        sync_client.exec("true", rlimits={"bogus": 1})
    # The agent validates too (raw request with a bad type).
    with pytest.raises(AgentError) as e:
        sync_client.run(_raw_exec(sync_client, {"cmd": "echo", "args": "not-a-list"}))
    assert e.value.kind == "bad_args"


async def _raw_exec(c: SyncAgentClient, payload: dict[str, object]) -> None:
    from microvm.agent import ExecProcess

    await ExecProcess(c.client, payload, None).start()


def test_stdin_collected_and_large_output(sync_client: SyncAgentClient) -> None:
    data = os.urandom(3 * 1024 * 1024)
    r = sync_client.exec("cat", stdin=data)
    assert r.stdout == data
    r = sync_client.exec("head", ["-c", "5000000", "/dev/zero"])
    assert r.stdout == bytes(5_000_000)
    # No stdin requested: the process reads /dev/null and does not hang.
    assert sync_client.exec("cat", timeout=10).stdout == b""


def test_stdin_flow_control_loses_nothing(sync_client: SyncAgentClient) -> None:
    # 40 MiB to a process that only starts reading after a pause: far beyond the
    # agent's 16 MiB buffer, so the client must wait for stdin acks.
    data = os.urandom(40 * 1024 * 1024)
    r = sync_client.exec("sh", ["-c", "sleep 0.5; sha256sum"], stdin=data, timeout=60)
    import hashlib

    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    # A process that closes stdin early: the rest is credited back, no stall.
    r = sync_client.exec("head", ["-c", "10"], stdin=data, timeout=60)
    assert r.stdout == data[:10]


def test_stdin_streaming_interactive(agent_bin: Path) -> None:
    async def main() -> None:
        async with host_agent(agent_bin) as (client, _):
            proc = await client.exec_stream(
                "sh", ["-c", 'while read line; do echo "got:$line"; done; echo bye']
            )
            for word in ("one", "two", "three"):
                await proc.write_stdin(word.encode() + b"\n")
                ev = await proc.next_event(timeout=10)
                assert ev is not None and ev.kind == "stdout"
                assert ev.data == f"got:{word}\n".encode()
            await proc.close_stdin()
            result = await proc.wait(timeout=10)
            assert result.exit_code == 0
            assert result.stdout == b"bye\n"

    asyncio.run(main())


def test_event_iteration(agent_bin: Path) -> None:
    async def main() -> None:
        async with host_agent(agent_bin) as (client, _):
            kinds = []
            out = b""
            async for ev in client.exec_stream("sh", ["-c", "echo a; echo b >&2; exit 4"]):
                kinds.append(ev.kind)
                if ev.kind == "stdout":
                    out += ev.data
                if ev.kind == "exited":
                    assert ev.exit_code == 4
            assert kinds[0] == "started" and kinds[-1] == "exited"
            assert "stderr" in kinds and out == b"a\n"

    asyncio.run(main())


def test_wait_after_the_events_were_consumed(agent_bin: Path) -> None:
    """wait() after iterating every event returns the exit the iteration saw (it used to
    wait for an exit that had already been delivered, then raise ExecTimeout)."""
    async def main() -> None:
        async with host_agent(agent_bin) as (client, _):
            proc = await client.exec_stream("sh", ["-c", "echo a; exit 5"], stdin=False)
            kinds = [ev.kind async for ev in proc]
            assert kinds[-1] == "exited"
            result = await proc.wait(timeout=5)
            assert result.exit_code == 5 and not result.timed_out

    asyncio.run(main())


def test_tty_with_resize(agent_bin: Path) -> None:
    async def main() -> None:
        async with host_agent(agent_bin) as (client, _):
            script = 'stty size; [ -t 0 ] && echo tty; read x; stty size; echo "x=$x"'
            proc = await client.exec_stream("sh", ["-c", script], tty=True, rows=30, cols=100)
            buf = b""
            while b"tty" not in buf:
                ev = await proc.next_event(timeout=10)
                assert ev is not None and ev.kind == "stdout", ev
                buf += ev.data
            assert b"30 100" in buf
            await proc.resize(45, 132)
            await proc.write_stdin(b"hello\n")
            result = await proc.wait(timeout=10)
            rest = result.stdout
            assert b"45 132" in rest
            assert b"x=hello" in rest
            assert result.stderr == b""  # a tty merges stderr into the terminal
            assert result.exit_code == 0

    asyncio.run(main())


def test_tty_eof_ends_cat(sync_client: SyncAgentClient) -> None:
    r = sync_client.exec("cat", stdin=b"abc\n", tty=True, timeout=10)
    assert r.exit_code == 0
    assert b"abc" in r.stdout


def test_signal_kills_process_group(agent_bin: Path) -> None:
    async def main() -> None:
        async with host_agent(agent_bin) as (client, _):
            proc = await client.exec_stream(
                "sh", ["-c", "sleep 300 & echo $!; sleep 300 & echo $!; wait"]
            )
            pids: list[int] = []
            out = b""
            while len(pids) < 2:
                ev = await proc.next_event(timeout=10)
                assert ev is not None
                out += ev.data
                pids = [int(x) for x in out.split()]
            await proc.signal(signal.SIGTERM)
            result = await proc.wait(timeout=10)
            assert (result.exit_code, result.signal) == (-1, signal.SIGTERM)
            assert _wait_dead([proc.pid, *pids]) == []

    asyncio.run(main())


def test_timeout_kills_process_group(sync_client: SyncAgentClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    t0 = time.monotonic()
    with pytest.raises(ExecTimeout) as e:
        sync_client.exec(
            "sh", ["-c", f"sleep 300 & echo $! > {pidfile}; echo started; wait"], timeout=1.0
        )
    assert time.monotonic() - t0 < 8
    result = e.value.result
    assert result is not None
    assert result.stdout == b"started\n"
    assert result.timed_out and result.signal == signal.SIGKILL
    assert _wait_dead([int(pidfile.read_text())]) == []


def test_rlimits(sync_client: SyncAgentClient) -> None:
    r = sync_client.exec(
        "sh", ["-c", "ulimit -n; ulimit -Hn; ulimit -c"], rlimits={"nofile": (64, 128), "core": 0}
    )
    assert r.stdout.split() == [b"64", b"128", b"0"]
    r = sync_client.exec("sh", ["-c", "ulimit -s"], rlimits={"stack": None})
    assert r.stdout.strip() == b"unlimited"
    # CPU limit: a busy loop is killed by SIGXCPU/SIGKILL after ~1 s of CPU.
    r = sync_client.exec("sh", ["-c", "while :; do :; done"], rlimits={"cpu": 1}, timeout=20)
    assert r.exit_code == -1 and r.signal in (signal.SIGXCPU, signal.SIGKILL)


def test_user_switching(sync_client: SyncAgentClient, tmp_path: Path) -> None:
    require_root()
    r = sync_client.exec("sh", ["-c", "id -u; id -g; echo $HOME $USER"], user="nobody")
    uid, _gid, rest = r.stdout.decode().split("\n", 2)
    assert uid == "65534"
    assert "nobody" in rest
    r = sync_client.exec("id", ["-u", "-g"], user="1234:2345")
    r2 = sync_client.exec("sh", ["-c", "id -u; id -g; id -G"], user="1234:2345")
    assert r2.stdout.split() == [b"1234", b"2345", b"2345"], (r.stdout, r2.stdout)
    assert sync_client.exec("id", ["-u"], user=4321).stdout == b"4321\n"
    # The switched user really lacks root's rights.
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o600)
    r = sync_client.exec("cat", [str(secret)], user="1234:2345")
    assert r.exit_code != 0 and b"ermission denied" in r.stderr
    with pytest.raises(AgentError) as e:
        sync_client.exec("true", user="no-such-user-xyz")
    assert e.value.kind == "user_setup_failed"
    assert "no-such-user-xyz" in str(e.value)


def test_fifty_concurrent_execs(agent_bin: Path) -> None:
    async def main() -> None:
        async with host_agent(agent_bin) as (client, _):
            results = await asyncio.gather(
                *[
                    client.exec("sh", ["-c", f"sleep 0.2; echo {i}; echo e{i} >&2; exit {i % 7}"])
                    for i in range(50)
                ]
            )
            for i, r in enumerate(results):
                assert r.stdout == f"{i}\n".encode()
                assert r.stderr == f"e{i}\n".encode()
                assert r.exit_code == i % 7

    asyncio.run(main())
