"""fs operations through the host-mode agent."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from microvm.agent import AgentError, SyncAgentClient
from tests.microvm.agent.conftest import host_agent


def test_ten_megabyte_round_trip(sync_client: SyncAgentClient, tmp_path: Path) -> None:
    data = os.urandom(10 * 1024 * 1024 + 123)
    path = str(tmp_path / "big.bin")
    assert sync_client.write_file(path, data, mode=0o600) == len(data)
    assert hashlib.sha256(Path(path).read_bytes()).digest() == hashlib.sha256(data).digest()
    assert (Path(path).stat().st_mode & 0o777) == 0o600
    back = sync_client.read_file(path)
    assert back == data


def test_streamed_write_and_ranged_read(agent_bin: Path, tmp_path: Path) -> None:
    async def main() -> None:
        async with host_agent(agent_bin) as (client, _):
            path = str(tmp_path / "sub" / "dir" / "stream.bin")
            chunks = [bytes([i]) * 300_000 for i in range(10)]

            async def gen():
                for c in chunks:
                    yield c

            n = await client.write_file_chunks(path, gen(), mkdirs=True)
            assert n == 3_000_000
            got = [c async for c in client.read_file_chunks(path, offset=299_990, length=20)]
            assert b"".join(got) == bytes([0]) * 10 + bytes([1]) * 10

    asyncio.run(main())


def test_list_stat_mkdir_rename_copy_remove(sync_client: SyncAgentClient, tmp_path: Path) -> None:
    root = tmp_path / "t"
    sync_client.mkdir(str(root / "a" / "b"), parents=True)
    sync_client.write_file(str(root / "a" / "b" / "f.txt"), b"hello", mode=0o640)
    os.symlink("b/f.txt", root / "a" / "link")
    names = {e.name: e for e in sync_client.list_dir(str(root / "a"))}
    assert names["b"].type == "dir"
    assert names["link"].type == "symlink"
    st = sync_client.stat(str(root / "a" / "b" / "f.txt"))
    assert (st.type, st.size, st.mode) == ("file", 5, 0o640)
    lst = sync_client.stat(str(root / "a" / "link"), follow=False)
    assert (lst.type, lst.target) == ("symlink", "b/f.txt")
    sync_client.copy(str(root / "a"), str(root / "copy"), recursive=True)
    assert (root / "copy" / "b" / "f.txt").read_bytes() == b"hello"
    assert (root / "copy" / "b" / "f.txt").stat().st_mode & 0o777 == 0o640
    assert os.readlink(root / "copy" / "link") == "b/f.txt"
    sync_client.rename(str(root / "copy"), str(root / "moved"))
    assert not (root / "copy").exists() and (root / "moved").is_dir()
    with pytest.raises(AgentError) as e:
        sync_client.remove(str(root / "moved"))
    assert e.value.errno_name == "ENOTEMPTY"
    sync_client.remove(str(root / "moved"), recursive=True)
    assert not (root / "moved").exists()
    sync_client.remove(str(root / "a" / "link"))
    assert (root / "a" / "b" / "f.txt").exists()


def test_fs_errors_name_the_path(sync_client: SyncAgentClient, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    for call in (
        lambda: sync_client.read_file(missing),
        lambda: sync_client.stat(missing),
        lambda: sync_client.list_dir(missing),
        lambda: sync_client.remove(missing),
        lambda: sync_client.rename(missing, missing + "2"),
    ):
        with pytest.raises(AgentError) as e:
            call()
        assert e.value.errno_name == "ENOENT"
        assert missing in str(e.value)
    with pytest.raises(AgentError) as e:
        sync_client.read_file(str(tmp_path))
    assert e.value.errno_name == "EISDIR"
    with pytest.raises(AgentError) as e:
        sync_client.write_file(str(tmp_path / "nodir" / "f"), b"x" * 3_000_000)
    assert e.value.errno_name == "ENOENT"
    # The channel stays usable after a failed streamed write.
    assert sync_client.exec("echo", ["ok"]).stdout == b"ok\n"
    with pytest.raises(ValueError):
        sync_client.read_file("")
    with pytest.raises(ValueError):
        sync_client.write_file("/tmp/x\0y", b"")


def test_non_utf8_names_survive(sync_client: SyncAgentClient, tmp_path: Path) -> None:
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9"
    with open(raw, "wb") as f:
        f.write(b"x")
    os.symlink(b"\xff\xfe", os.fsencode(str(tmp_path)) + b"/link")
    entries = {e.name: e for e in sync_client.list_dir(str(tmp_path))}
    assert os.fsencode(next(n for n in entries if n.startswith("caf"))) == b"caf\xe9"
    st = sync_client.stat(str(tmp_path / "link"), follow=False)
    assert os.fsencode(st.target or "") == b"\xff\xfe"
    # A path that is valid for the host but long enough to be cut mid-character in a message.
    with pytest.raises(AgentError):
        sync_client.exec("/" + "\u00e9" * 150)
    assert sync_client.exec("echo", ["still ok"]).stdout == b"still ok\n"
