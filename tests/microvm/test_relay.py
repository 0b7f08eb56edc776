"""AgentRelay: many ordinary agent clients through one supervisor-held agent connection.

One real guest (busybox + the static agent, QEMU; TCG here) is booted for the
module with ``Machine.astart()`` on a background event-loop thread, where the
relay serves it on a unix socket; the tests are ordinary clients in their own
loops (or ``SyncAgentClient``). The upstream-loss and stall tests use the same
agent binary in host mode (a real agent, no boot) so they can kill it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from microvm import Machine, build_ext4
from microvm.agent import AgentClient, SyncAgentClient, agent_binary
from microvm.agent.protocol import TERMINAL, Frame, FrameDecoder, encode_frame
from microvm.errors import AgentError, SandboxConfigError
from microvm.kernel import Kernel
from microvm.sandbox._relay import HIGH_WATER, AgentRelay
from tests.support import assert_tty_resize, require_binaries

pytestmark = [pytest.mark.vm, pytest.mark.timeout(180)]

T = TypeVar("T")
BIG = 10 * 1024 * 1024


@dataclass
class Guest:
    """The module's guest: its loop thread, machine, upstream client and relay."""

    loop: asyncio.AbstractEventLoop
    machine: Machine
    upstream: AgentClient
    relay: AgentRelay
    sock: Path
    activity: list[float]

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run a coroutine on the relay's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def state(self) -> tuple[int, int]:
        """(clients, sessions) read on the relay's loop."""

        async def read() -> tuple[int, int]:
            return self.relay.clients, self.relay.sessions

        return self.call(read())

    def wait_state(self, clients: int | None = None, sessions: int = 0, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            c, s = self.state()
            if (clients is None or c == clients) and s == sessions:
                return
            assert time.monotonic() < deadline, f"relay stuck at clients={c} sessions={s}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def guest(kernel: Kernel, busybox_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    require_binaries("qemu-system-x86_64", "mkfs.ext4")
    work = tmp_path_factory.mktemp("relay")
    img = build_ext4(busybox_root, work / "root.img", agent=agent_binary(), free_mib=64)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="relay-test-loop", daemon=True)
    thread.start()

    def call(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(180)

    m = Machine("qemu", kernel=kernel, disks=[img], cpus=1, memory=256,
                bootstrap={"hostname": "relay-box"})  # fmt: skip
    relay: AgentRelay | None = None
    try:
        upstream = call(m.astart())
        activity: list[float] = []

        async def serve() -> AgentRelay:
            r = AgentRelay(upstream, upstream.ready, on_activity=lambda: activity.append(0.0) if not activity else None)
            await r.serve_unix(work / "agent.sock")
            return r

        relay = call(serve())
        yield Guest(loop, m, upstream, relay, work / "agent.sock", activity)
    finally:
        with contextlib.suppress(Exception):
            if relay is not None:
                call(relay.close())
        with contextlib.suppress(Exception):
            call(m.ashutdown())
        m.kill()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.asynccontextmanager
async def client(path: Path) -> AsyncIterator[AgentClient]:
    c = await AgentClient.connect_unix(path, timeout=10)
    try:
        await c.hello()
        yield c
    finally:
        await c.close()


def guest_alive(g: Guest, pid: int) -> bool:
    with SyncAgentClient.connect_unix(g.sock) as c:
        c.hello()
        return c.exec("/bin/sh", ["-c", f"test -e /proc/{pid}"]).exit_code == 0


def wait_gone(g: Guest, pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while guest_alive(g, pid):
        assert time.monotonic() < deadline, f"guest pid {pid} still alive"
        time.sleep(0.2)


# ---- argument checking ----------------------------------------------------
def test_bad_arguments_raise_typed_errors(guest: Guest) -> None:
    with pytest.raises(SandboxConfigError, match="max_clients"):
        AgentRelay(guest.upstream, max_clients=0)
    with pytest.raises(SandboxConfigError, match="stall_timeout"):
        AgentRelay(guest.upstream, stall_timeout=-1)
    with pytest.raises(SandboxConfigError, match="upstream"):
        AgentRelay("nope", None)  # type: ignore[arg-type]

    async def long_path() -> None:
        await AgentRelay(guest.upstream).serve_unix(Path("/tmp/" + "x" * 120))

    with pytest.raises(SandboxConfigError, match="longer than"):
        guest.call(long_path())
    assert os.stat(guest.sock).st_mode & 0o777 == 0o600


# ---- the protocol through the relay ----------------------------------------
def test_hello_is_local_and_bootstrap_shutdown_are_refused(guest: Guest) -> None:
    async def main() -> None:
        async with client(guest.sock) as c:
            ready = c.ready
            assert ready is not None and ready == guest.upstream.ready
            assert (await c.hello(version=7)).generation == 1  # min of the versions
            with pytest.raises(AgentError) as ei:
                await c.hello(version=0)
            assert ei.value.kind == "version"
            with pytest.raises(AgentError, match="reserved to the sandbox supervisor") as ei:
                await c.bootstrap({"hostname": "evil"})
            assert ei.value.kind == "bad_request"
            with pytest.raises(AgentError, match="reserved to the sandbox supervisor") as ei:
                await c.shutdown(0)
            assert ei.value.kind == "bad_request"
            assert (await c.exec("/bin/hostname")).stdout == b"relay-box\n"
            assert await c.ping() >= 0
            assert (await c.metrics())["uptime_ms"] > 0

    asyncio.run(main())
    assert guest.activity  # on_activity was called
    assert guest.machine.handle.poll() is None  # the guest is still up


def test_two_clients_with_overlapping_ids(guest: Guest) -> None:
    async def main() -> None:
        async with client(guest.sock) as a, client(guest.sock) as b:
            # both allocate ids 1, 2, 3, ... independently
            runs, passwd = await asyncio.gather(
                asyncio.gather(
                    *(a.exec("/bin/echo", [f"a{i}"]) for i in range(8)),
                    *(b.exec("/bin/echo", [f"b{i}"]) for i in range(8)),
                    a.exec("/bin/sh", ["-c", "echo slow-a; sleep 0.3; echo done-a"]),
                ),
                b.read_file("/etc/passwd"),
            )
            assert [r.stdout for r in runs[:8]] == [f"a{i}\n".encode() for i in range(8)]
            assert [r.stdout for r in runs[8:16]] == [f"b{i}\n".encode() for i in range(8)]
            assert runs[16].stdout == b"slow-a\ndone-a\n"
            assert passwd.startswith(b"root:x:0:0")
            assert guest.relay.clients >= 2

    asyncio.run(main())
    guest.wait_state(sessions=0)


def test_exec_collected_and_streamed_with_stdin(guest: Guest) -> None:
    with SyncAgentClient.connect_unix(guest.sock) as c:
        c.hello()
        r = c.exec("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
        with pytest.raises(AgentError) as ei:
            c.exec("/no/such/binary")
        assert ei.value.kind == "not_found"
        # more than the client's 8 MiB stdin window: needs the relayed stdin acks
        data = os.urandom(BIG)
        r = c.exec("/bin/sh", ["-c", "wc -c; echo done >&2"], stdin=data, timeout=120)
        assert (r.exit_code, r.stdout.strip(), r.stderr) == (0, str(BIG).encode(), b"done\n")
        p = c.exec_stream("/bin/cat")
        for i in range(5):
            p.write_stdin(f"line {i}\n".encode())
        p.close_stdin()
        out, last = b"", None
        for ev in p.events(timeout=30):
            if ev.kind == "stdout":
                out += ev.data
            last = ev
        assert last is not None and last.kind == "exited" and last.exit_code == 0
        assert out == b"".join(f"line {i}\n".encode() for i in range(5))


def test_tty_and_resize(guest: Guest) -> None:
    with SyncAgentClient.connect_unix(guest.sock) as c:
        c.hello()
        assert_tty_resize(c, timeout=30)


def test_signal(guest: Guest) -> None:
    async def main() -> None:
        async with client(guest.sock) as c:
            p = await c.exec_stream("/bin/sh", ["-c", "echo ready; exec sleep 31337"])
            ev = await p.next_event(timeout=30)
            assert ev is not None and ev.data == b"ready\n"
            await p.signal(signal.SIGTERM)
            r = await p.wait(timeout=30)
            assert (r.exit_code, r.signal) == (-1, signal.SIGTERM)

    asyncio.run(main())


def test_disconnect_mid_exec_kills_the_process(guest: Guest) -> None:
    async def start_and_leave() -> int:
        c = await AgentClient.connect_unix(guest.sock)
        await c.hello()
        p = await c.exec_stream("/bin/sh", ["-c", "sleep 31337 & exec sleep 31338"])
        assert guest.relay.sessions >= 1
        await c.close()  # without killing, waiting or closing stdin
        return p.pid

    pid = asyncio.run(start_and_leave())
    wait_gone(guest, pid)
    with SyncAgentClient.connect_unix(guest.sock) as c:
        c.hello()
        r = c.exec("/bin/sh", ["-c", "ps -o args | grep -c '^sleep 3133[78]' || true"])
        assert r.stdout.strip() == b"0"  # the background child died with the group
    guest.wait_state(sessions=0)


def test_ten_megabytes_both_ways_with_checksum(guest: Guest) -> None:
    data = os.urandom(BIG)

    async def main() -> None:
        async with client(guest.sock) as a, client(guest.sock) as b:
            assert await a.write_file("/root/big.bin", data) == BIG
            r = await b.exec("/bin/sha256sum", ["/root/big.bin"], timeout=60)
            assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
            back = await b.read_file("/root/big.bin")
            assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()

    asyncio.run(main())
    guest.wait_state(sessions=0)


def test_slow_reader_is_not_buffered_whole(guest: Guest) -> None:
    """A client that requests 10 MB and does not read: the relay holds ~HIGH_WATER, not 10 MB."""
    with SyncAgentClient.connect_unix(guest.sock) as c:
        c.hello()
        c.write_file("/root/slow.bin", os.urandom(BIG))
        expect = hashlib.sha256(c.read_file("/root/slow.bin")).hexdigest()

    async def main() -> None:
        r, w = await asyncio.open_unix_connection(str(guest.sock))
        w.write(encode_frame(Frame(1, TERMINAL, "core.fs.request", {"op": "read", "path": "/root/slow.bin"})))
        await w.drain()
        await asyncio.sleep(2)  # the agent keeps sending; the relay must stop reading it

        async def held() -> int:
            queued = sum(q.qsize() for q in guest.upstream._routes.values())
            return guest.relay.buffered + queued * 256 * 1024

        assert guest.call(held()) <= HIGH_WATER + 2 * 1024 * 1024
        dec, h, done = FrameDecoder(), hashlib.sha256(), False
        while not done:
            chunk = await r.read(256 * 1024)
            assert chunk, "relay closed the slow reader"
            for f in dec.feed(chunk):
                if f.type == "core.fs.data":
                    h.update(f.payload["data"])
                else:
                    assert f.payload["ok"] is True and f.payload["size"] == BIG and f.terminal
                    done = True
        assert h.hexdigest() == expect
        w.close()
        await w.wait_closed()

    asyncio.run(main())
    guest.wait_state(sessions=0)


def test_abandoned_upload_is_removed(guest: Guest) -> None:
    async def main() -> None:
        _, w = await asyncio.open_unix_connection(str(guest.sock))
        w.write(encode_frame(Frame(1, 0, "core.fs.request", {"op": "write", "path": "/root/partial.bin"})))
        w.write(encode_frame(Frame(1, 0, "core.fs.data", {"data": b"x" * 100_000})))
        await w.drain()
        async with client(guest.sock) as c:
            deadline = time.monotonic() + 20
            while not (await c.exec("/bin/sh", ["-c", "test -s /root/partial.bin"])).ok:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            w.close()  # mid-upload
            await w.wait_closed()
            while (await c.exec("/bin/sh", ["-c", "test -e /root/partial.bin"])).ok:
                assert time.monotonic() < deadline, "the partial upload was left behind"
                await asyncio.sleep(0.1)

    asyncio.run(main())
    guest.wait_state(sessions=0)


def test_garbage_client_is_dropped_and_others_carry_on(guest: Guest) -> None:
    async def main() -> None:
        async with client(guest.sock) as good:
            p = await good.exec_stream("/bin/cat")
            await p.write_stdin(b"before\n")
            for garbage, kind, eof in (
                (b"\xff" * 64, "oversized", False),
                (struct.pack(">IIB", 6, 1, 0) + b"\xff", "malformed", False),  # not CBOR
                (encode_frame(Frame(1, 0, "x", None))[:9] + b"\x01\x02", "malformed", True),  # cut short
            ):
                r, w = await asyncio.open_unix_connection(str(guest.sock))
                w.write(garbage)
                if eof:
                    w.write_eof()
                await w.drain()
                reply = await asyncio.wait_for(r.read(), 30)  # until the relay closes it
                frames = FrameDecoder().feed(reply)
                assert [(f.id, f.type, f.payload["kind"]) for f in frames] == [(0, "core.error", kind)]
                w.close()
                await w.wait_closed()
            await p.write_stdin(b"after\n")
            await p.close_stdin()
            res = await p.wait(timeout=30)
            assert res.stdout == b"before\nafter\n"

    asyncio.run(main())
    guest.wait_state(sessions=0)


def test_many_sync_clients_in_threads(guest: Guest) -> None:
    def one(i: int) -> bytes:
        with SyncAgentClient.connect_unix(guest.sock) as c:
            c.hello()
            return c.exec("/bin/sh", ["-c", f"echo {i}"]).stdout

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(one, range(16))) == [f"{i}\n".encode() for i in range(16)]
    guest.wait_state(clients=0, sessions=0)


def test_max_clients_and_close_leaves_nothing(guest: Guest, tmp_path: Path) -> None:
    path = tmp_path / "second.sock"

    async def start() -> tuple[AgentRelay, set[asyncio.Task[Any]]]:
        before = set(asyncio.all_tasks())
        r = AgentRelay(guest.upstream, guest.upstream.ready, max_clients=2)
        await r.serve_unix(path)
        return r, before

    relay, before = guest.call(start())
    a = SyncAgentClient.connect_unix(path)
    b = SyncAgentClient.connect_unix(path)
    try:
        a.hello()
        b.hello()
        with socket.socket(socket.AF_UNIX) as s:  # the third client is refused
            s.connect(str(path))
            s.settimeout(30)
            buf = b""
            while chunk := s.recv(4096):
                buf += chunk
            (f,) = FrameDecoder().feed(buf)
            assert (f.id, f.type, f.payload["kind"]) == (0, "core.error", "resource_limit")
        p = a.exec_stream("/bin/sh", ["-c", "exec sleep 31339"])
        w = b.exec_stream("/bin/cat")
        w.write_stdin(b"x")

        async def close() -> list[asyncio.Task[Any]]:
            await relay.close()
            await asyncio.sleep(0)
            return [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]

        assert guest.call(close()) == []
        assert relay.clients == 0 and relay.sessions == 0
        assert not path.exists()
        with pytest.raises(AgentError) as ei:
            p.wait(timeout=30)
        assert ei.value.kind == "connection_lost"
        wait_gone(guest, p.pid)
        wait_gone(guest, w.pid)
    finally:
        a.close()
        b.close()


# ---- host-mode agent: upstream loss and a stalled client --------------------
@contextlib.asynccontextmanager
async def host_relay(tmp: Path, **kw: Any) -> AsyncIterator[tuple[AgentRelay, subprocess.Popen[bytes], Path]]:
    host, peer = socket.socketpair()
    proc = subprocess.Popen([str(agent_binary()), "--channel-fd", str(peer.fileno())], pass_fds=[peer.fileno()])
    peer.close()
    up = await AgentClient.from_socket(host)
    relay: AgentRelay | None = None
    try:
        await up.hello()
        relay = AgentRelay(up, **kw)
        await relay.serve_unix(tmp / "agent.sock")
        yield relay, proc, tmp / "agent.sock"
    finally:
        if relay is not None:
            await relay.close()
        await up.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        proc.kill()
        proc.wait()


def test_upstream_loss_reaches_every_client(tmp_path: Path) -> None:
    async def main() -> None:
        async with host_relay(tmp_path) as (relay, proc, path), client(path) as a, client(path) as b:
            pa = await a.exec_stream("/bin/sleep", ["30"])
            pb = await b.exec_stream("/bin/sleep", ["30"])
            proc.kill()
            for p in (pa, pb):
                with pytest.raises(AgentError) as ei:
                    await p.wait(timeout=20)
                assert ei.value.kind == "connection_lost"
            for _ in range(200):
                if relay.clients == 0 and a.closed and b.closed:
                    break
                await asyncio.sleep(0.05)
            assert relay.clients == 0 and a.closed and b.closed
            r, w = await asyncio.open_unix_connection(str(path))  # late comers are told too
            (f,) = FrameDecoder().feed(await asyncio.wait_for(r.read(), 20))
            assert (f.id, f.payload["kind"]) == (0, "connection_lost")
            w.close()
            await w.wait_closed()

    asyncio.run(main())


def test_stalled_client_is_dropped_and_others_carry_on(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(BIG))

    async def main() -> None:
        async with host_relay(tmp_path, stall_timeout=1.0) as (relay, _, path), client(path) as good:
            _, w = await asyncio.open_unix_connection(str(path))
            w.write(encode_frame(Frame(1, TERMINAL, "core.fs.request", {"op": "read", "path": str(big)})))
            await w.drain()
            # the stalled client holds everyone up for at most stall_timeout, then is dropped
            assert await good.ping(timeout=20) >= 0
            assert (await good.read_file(str(big))) == big.read_bytes()
            for _ in range(200):
                if relay.clients == 1:
                    break
                await asyncio.sleep(0.05)
            assert relay.clients == 1
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()

    asyncio.run(main())


def test_error_ending_a_running_exec_kills_it(tmp_path: Path) -> None:
    """A bad resize makes the agent end the id with core.error: the relay kills the orphan."""

    async def main() -> None:
        async with host_relay(tmp_path) as (relay, _, path):
            r, w = await asyncio.open_unix_connection(str(path))
            req = {"cmd": "/bin/sleep", "args": ["30"], "tty": True, "rows": 24, "cols": 80}
            w.write(encode_frame(Frame(5, 0x02, "core.exec.request", req)))
            await w.drain()
            dec, frames = FrameDecoder(), list[Frame]()
            while not frames:
                frames = dec.feed(await r.read(4096))
            assert frames[0].type == "core.exec.started"
            pid = frames[0].payload["pid"]
            w.write(encode_frame(Frame(5, 0, "core.exec.resize", {"rows": 0, "cols": 80})))
            await w.drain()
            while not any(f.terminal for f in frames):
                frames += dec.feed(await r.read(4096))
            assert (frames[-1].type, frames[-1].payload["kind"]) == ("core.error", "bad_request")
            for _ in range(400):
                if relay.sessions == 0 and not os.path.exists(f"/proc/{pid}"):
                    break
                await asyncio.sleep(0.05)
            assert relay.sessions == 0 and not os.path.exists(f"/proc/{pid}")
            w.close()
            await w.wait_closed()

    asyncio.run(main())
