"""The asyncio agent client: :class:`AgentClient` = connection + session + exec + fs.

The session requests live here (``core.hello``, ``core.bootstrap``,
``core.reconfigure``, ``core.ping``, ``core.metrics.request``, ``core.shutdown``);
the channel is :class:`~microvm.agent._connection.AgentConnection`, processes are
:class:`~microvm.agent._exec.ExecOps`, files :class:`~microvm.agent._fs.FsOps`. The
blocking twin is :class:`~microvm.agent._sync.SyncAgentClient`.

Example (the agent in host mode on a socketpair; a guest's is ``connect_unix``)::

    >>> import asyncio, socket, subprocess
    >>> from microvm.agent import AgentClient, agent_binary
    >>> async def main(sock: socket.socket) -> None:
    ...     client = await AgentClient.from_socket(sock)
    ...     print((await client.hello()).host_mode)
    ...     print(await client.bootstrap({"hostname": "box"}))
    ...     r = await client.exec("sh", ["-c", "echo out; exit 3"], timeout=10)
    ...     print(r.exit_code, r.stdout)
    ...     await client.close()
    >>> host, guest = socket.socketpair()
    >>> agent = subprocess.Popen([str(agent_binary()), "--channel-fd", str(guest.fileno())],
    ...                          pass_fds=[guest.fileno()])
    >>> guest.close()
    >>> asyncio.run(main(host))
    True
    {...}
    3 b'out\\n'
    >>> agent.wait(10)
    0
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from microvm.agent._exec import ExecOps
from microvm.agent._fs import FsOps
from microvm.agent.protocol import (
    PROTOCOL_VERSION,
    ReadyInfo,
    field_int,
    field_str,
    payload_map,
)
from microvm.errors import AgentError

__all__ = ["AgentClient"]


class AgentClient(ExecOps, FsOps):
    """Asyncio client for the guest agent over a stream (unix socket or socketpair).

    Example::

        client = await AgentClient.connect_unix(path)
        info = await client.hello()
        result = await client.exec("echo", ["hello"])
    """

    async def hello(self, version: int = PROTOCOL_VERSION, timeout: float | None = 30.0) -> ReadyInfo:
        """Handshake: send ``core.hello``, return the agent's ``core.ready``.

        Example::

            info = await client.hello()
        """
        f = await self._request("core.hello", {"version": version}, "hello", timeout)
        if f.type != "core.ready":
            raise AgentError(f"hello: expected core.ready, got {f.type!r}", kind="protocol")
        p = payload_map(f)
        info = ReadyInfo(
            version=field_int(p, "version"),
            generation=field_int(p, "generation"),
            pid=field_int(p, "pid"),
            boot_ms=field_int(p, "boot_ms"),
            agent=field_str(p, "agent"),
            host_mode=p.get("host_mode") is True,
        )
        self.ready = info
        self.generation = max(1, info.generation)
        return info

    async def bootstrap(self, config: Mapping[str, Any], timeout: float | None = 60.0) -> dict[str, Any]:
        """Send the one-shot boot config; returns the ack payload (``{"skipped": [...]}``).

        Raises :class:`AgentError` (kind ``bootstrap_failed``/``bad_request``) naming the bad field.

        Example::

            await client.bootstrap({"hostname": "box", "env": {"LANG": "C.UTF-8"}})
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"bootstrap config must be a mapping, got {type(config).__name__}")
        f = await self._request("core.bootstrap", dict(config), "bootstrap", timeout)
        return dict(f.payload) if isinstance(f.payload, dict) else {}

    async def reconfigure(self, config: Mapping[str, Any], timeout: float | None = 30.0) -> list[str]:
        """Give a restored/forked guest a new identity (``core.reconfigure``); returns what
        was applied (``entropy``, ``clock``, ``network``, ``hostname``).

        Raises :class:`AgentError` (kind ``bad_request``/``bootstrap_failed``).

        Example::

            await client.reconfigure({"hostname": "fork-1", "entropy": os.urandom(64),
                                      "clock": {"realtime_ns": time.time_ns()}})
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"reconfigure config must be a mapping, got {type(config).__name__}")
        f = await self._request("core.reconfigure", dict(config), "reconfigure", timeout)
        applied = f.payload.get("applied", []) if isinstance(f.payload, dict) else []
        return [str(x) for x in applied]

    async def ping(self, timeout: float | None = 10.0) -> float:
        """Round-trip ``core.ping``; returns seconds.

        Example::

            rtt = await client.ping()
        """
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await self._request("core.ping", {}, "ping", timeout)
        return loop.time() - t0

    async def metrics(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """Guest metrics: uptime_ms, load, cpu ticks, memory/disk bytes, net counters.

        Example::

            m = await client.metrics()
            print(m["memory"]["available"])
        """
        f = await self._request("core.metrics.request", {}, "metrics", timeout)
        return dict(f.payload) if isinstance(f.payload, dict) else {}

    async def shutdown(self, exit_code: int = 0, timeout: float | None = 10.0) -> int:
        """Ask the agent to sync and power off (the VMM then exits); returns the acked code.

        Example::

            await client.shutdown(exit_code=0)
        """
        if not isinstance(exit_code, int) or not 0 <= exit_code <= 255:
            raise ValueError(f"exit_code must be an int 0..255, got {exit_code!r}")
        f = await self._request("core.shutdown", {"exit_code": exit_code}, "shutdown", timeout)
        return field_int(payload_map(f), "exit_code", exit_code)
