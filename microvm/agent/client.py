"""Alias module: the names ``microvm.agent.client`` held before the agent client was split.

The client now lives in one module per job; import from :mod:`microvm.agent` (or the
module named below). This alias stays so that code written against the old path keeps
working; new code should not use it.

* :mod:`microvm.agent.connection` -- the channel: connect, framing, ids, dispatch
* :mod:`microvm.agent.aclient` -- :class:`AgentClient` (session requests)
* :mod:`microvm.agent.exec` -- :class:`ExecProcess`, :func:`build_exec_request`
* :mod:`microvm.agent.fs` -- the file operations
* :mod:`microvm.agent.sync` -- :class:`SyncAgentClient`, :class:`SyncExecProcess`

Example::

    >>> from microvm.agent.client import AgentClient
    >>> from microvm.agent import AgentClient as Same
    >>> AgentClient is Same
    True
"""

from __future__ import annotations

from microvm.agent.aclient import AgentClient
from microvm.agent.connection import CHUNK, AgentConnection
from microvm.agent.exec import RLIMIT_NAMES, STDIN_WINDOW, ExecProcess, build_exec_request
from microvm.agent.sync import SyncAgentClient, SyncExecProcess

__all__ = [
    "CHUNK",
    "RLIMIT_NAMES",
    "STDIN_WINDOW",
    "AgentClient",
    "AgentConnection",
    "ExecProcess",
    "SyncAgentClient",
    "SyncExecProcess",
    "build_exec_request",
]
