"""Guest-agent protocol benchmark (host mode: the real agent over a socketpair, no VM).

Side by side in the same run:

* exec round trip (``client.exec("true")``) vs Python's own
  ``asyncio.create_subprocess_exec("true")`` on the host (``exec_ratio`` =
  baseline / agent; > 1 means the agent path is faster);
* 50 concurrent execs through the agent vs 50 concurrent asyncio subprocesses
  (``concurrent_exec_ratio``);
* file read through ``fs.read`` vs the naive way, ``exec("cat", [path])``
  through the same agent (``fs_read_ratio``), plus fs write throughput.

    python -m benchmarks.agent [--quick]   # last line: one JSON object
    python -m pytest benchmarks/agent.py   # pytest-benchmark
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import quick_main
from microvm.agent import AgentClient, agent_binary


async def _start() -> tuple[AgentClient, subprocess.Popen[bytes]]:
    host, guest = socket.socketpair()
    proc = subprocess.Popen([str(agent_binary()), "--channel-fd", str(guest.fileno())], pass_fds=[guest.fileno()])
    guest.close()
    client = await AgentClient.from_socket(host)
    await client.hello()
    return client, proc


async def _stop(client: AgentClient, proc: subprocess.Popen[bytes]) -> None:
    await client.close()
    proc.wait(10)


async def _timeit(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def measure(quick: bool) -> dict[str, Any]:
    n = 100 if quick else 500
    size = (32 if quick else 128) * 1024 * 1024
    client, proc = await _start()
    try:
        async def agent_exec() -> None:
            r = await client.exec("true")
            assert r.exit_code == 0

        async def host_exec() -> None:
            p = await asyncio.create_subprocess_exec("true")
            assert await p.wait() == 0

        await _timeit(agent_exec, 10)
        await _timeit(host_exec, 10)
        agent_lat = await _timeit(agent_exec, n)
        host_lat = await _timeit(host_exec, n)

        async def agent_many() -> None:
            rs = await asyncio.gather(*[client.exec("true") for _ in range(50)])
            assert all(r.exit_code == 0 for r in rs)

        async def host_many() -> None:
            ps = await asyncio.gather(*[asyncio.create_subprocess_exec("true") for _ in range(50)])
            assert all(c == 0 for c in await asyncio.gather(*[p.wait() for p in ps]))

        reps = 5 if quick else 20
        agent_conc = await _timeit(agent_many, reps)
        host_conc = await _timeit(host_many, reps)

        ping = await _timeit(client.ping, n)

        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "blob")
            data = os.urandom(size)
            t0 = time.perf_counter()
            await client.write_file(path, data)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = await client.read_file(path)
            read_s = time.perf_counter() - t0
            assert back == data
            t0 = time.perf_counter()
            r = await client.exec("cat", [path])
            cat_s = time.perf_counter() - t0
            assert r.stdout == data
    finally:
        await _stop(client, proc)
    mib = size / 2**20
    return {
        "exec_roundtrip_ms": round(statistics.median(agent_lat) * 1000, 3),
        "host_subprocess_ms": round(statistics.median(host_lat) * 1000, 3),
        "exec_ratio": round(statistics.median(host_lat) / statistics.median(agent_lat), 3),
        "concurrent50_exec_ms": round(statistics.median(agent_conc) * 1000, 2),
        "concurrent50_host_ms": round(statistics.median(host_conc) * 1000, 2),
        "concurrent_exec_ratio": round(statistics.median(host_conc) / statistics.median(agent_conc), 3),
        "ping_us": round(statistics.median(ping) * 1e6, 1),
        "fs_write_mib_s": round(mib / write_s, 1),
        "fs_read_mib_s": round(mib / read_s, 1),
        "exec_cat_mib_s": round(mib / cat_s, 1),
        "fs_read_ratio": round(cat_s / read_s, 3),
        "fs_bytes": size,
        "exec_samples": n,
    }


def test_agent_exec_roundtrip(benchmark) -> None:
    loop = asyncio.new_event_loop()
    client, proc = loop.run_until_complete(_start())
    try:
        benchmark(lambda: loop.run_until_complete(client.exec("true")))
    finally:
        loop.run_until_complete(_stop(client, proc))
        loop.close()


def test_agent_fs_read_8mib(benchmark, tmp_path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 * 2**20))
    loop = asyncio.new_event_loop()
    client, proc = loop.run_until_complete(_start())
    try:
        benchmark(lambda: loop.run_until_complete(client.read_file(str(path))))
    finally:
        loop.run_until_complete(_stop(client, proc))
        loop.close()


def main() -> None:
    quick_main(__doc__, lambda q: asyncio.run(measure(q)), "fewer samples, 32 MiB file (under a minute)")


if __name__ == "__main__":
    main()
