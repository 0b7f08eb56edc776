"""Fixtures: the guest agent run in host mode (``--channel-fd``) over a socketpair."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from microvm.agent import AgentClient, SyncAgentClient, agent_binary


@pytest.fixture(scope="session")
def agent_bin() -> Path:
    """The static agent, built on demand."""
    return agent_binary()


def spawn(agent_bin: Path, *extra: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the agent in host mode on one end of a socketpair; return (process, host end)."""
    host, guest = socket.socketpair()
    proc = subprocess.Popen(
        [str(agent_bin), "--channel-fd", str(guest.fileno()), *extra],
        pass_fds=[guest.fileno()],
    )
    guest.close()
    return proc, host


def reap(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """Wait for the agent to exit (it exits when the host end closes); kill if it hangs."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("agent did not exit after the host closed the channel") from None


@contextlib.asynccontextmanager
async def host_agent(
    agent_bin: Path, *extra: str
) -> AsyncIterator[tuple[AgentClient, subprocess.Popen[bytes]]]:
    """An asyncio AgentClient (hello done) talking to a fresh host-mode agent."""
    proc, sock = spawn(agent_bin, *extra)
    client = await AgentClient.from_socket(sock)
    try:
        await client.hello()
        yield client, proc
    finally:
        await client.close()
        rc = reap(proc)
        assert rc == 0 or rc > 0, f"agent died by signal {-rc}"


@pytest.fixture()
def sync_client(agent_bin: Path) -> Iterator[SyncAgentClient]:
    """A SyncAgentClient (hello done) talking to a fresh host-mode agent."""
    proc, sock = spawn(agent_bin)
    c = SyncAgentClient.from_socket(sock)
    try:
        c.hello()
        yield c
    finally:
        c.close()
        rc = reap(proc)
        assert rc >= 0, f"agent died by signal {-rc}"
