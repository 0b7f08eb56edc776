"""The guest agent: static C PID 1 (``csrc/``) and its host-side client.

One module per job: :mod:`~microvm.agent.protocol` (frames, CBOR, message types),
:mod:`~microvm.agent._connection` (the channel: connect, ids, dispatch),
:mod:`~microvm.agent._aclient` (:class:`AgentClient`: session requests),
:mod:`~microvm.agent._exec` (processes), :mod:`~microvm.agent._fs` (files) and
:mod:`~microvm.agent._sync` (the blocking twin, run on a :mod:`microvm._portal`).

Example::

    from microvm.agent import AgentClient, agent_binary
    print(agent_binary())            # built on demand in a dev checkout
    client = await AgentClient.connect_unix("/run/vm/agent.sock")
    await client.hello()
"""

from __future__ import annotations

import os
from pathlib import Path

from microvm.agent._aclient import AgentClient
from microvm.agent._connection import AgentConnection
from microvm.agent._exec import RLIMIT_NAMES, ExecProcess, build_exec_request
from microvm.agent._sync import SyncAgentClient, SyncExecProcess
from microvm.agent.protocol import (
    ExecEvent,
    ExecResult,
    FileStat,
    Frame,
    FrameDecoder,
    ProtocolError,
    ReadyInfo,
    encode_frame,
)
from microvm.errors import AgentError, ExecTimeout

__all__ = [
    "RLIMIT_NAMES",
    "AgentClient",
    "AgentConnection",
    "AgentError",
    "ExecEvent",
    "ExecProcess",
    "ExecResult",
    "ExecTimeout",
    "FileStat",
    "Frame",
    "FrameDecoder",
    "ProtocolError",
    "ReadyInfo",
    "SyncAgentClient",
    "SyncExecProcess",
    "agent_binary",
    "build_exec_request",
    "encode_frame",
]

_PKG = Path(__file__).resolve().parent.parent


def agent_binary(rebuild: bool = False) -> Path:
    """Path of the static agent; built into ``microvm/_bin/`` when missing or stale.

    ``MICROVM_AGENT_BINARY`` overrides the path (no build then).

    Example::

        path = agent_binary()
        subprocess.run([path, "--version"])
    """
    override = os.environ.get("MICROVM_AGENT_BINARY")
    if override:
        p = Path(override)
        if not p.is_file():
            raise AgentError(f"MICROVM_AGENT_BINARY={override!r} is not a file", kind="not_found")
        return p
    from microvm import _native_build

    out = _PKG / "_bin" / "microvm-agent"
    sources = [*_native_build.agent_sources(), _native_build.CSRC / "agent.h"]
    if not rebuild and out.is_file():
        newest = max((s.stat().st_mtime for s in sources if s.exists()), default=0.0)
        # Stale only matters in a writable dev checkout; an installed copy is used as shipped.
        if not sources or out.stat().st_mtime >= newest or not os.access(out.parent, os.W_OK):
            return out
    if not sources:
        raise AgentError(f"agent binary {out} is missing and no sources to build it", kind="not_found")
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        newest = max(s.stat().st_mtime for s in sources if s.exists())
        if rebuild or not out.is_file() or out.stat().st_mtime < newest:
            try:
                _native_build.compile_agent(out)
            except _native_build.NativeBuildError as e:
                raise AgentError(f"building the guest agent failed: {e}", kind="build_failed") from None
    return out
