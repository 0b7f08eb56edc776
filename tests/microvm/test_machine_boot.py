"""Machine: validation and boot failures (guest panic, no agent) surfacing as BootError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microvm import BootError, Machine
from microvm.backends import Disk
from microvm.errors import MicrovmError
from microvm.kernel import Kernel
from tests.support import require_binaries

pytestmark = pytest.mark.vm


def _need_agent_client() -> None:
    try:
        from microvm.agent import SyncAgentClient  # noqa: F401
    except ImportError as e:
        pytest.skip(f"guest agent client not available yet: {e}")


def test_validation_before_anything_starts(kernel: Kernel, tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    img.write_bytes(b"")
    with pytest.raises(MicrovmError, match="bad cpus 99"):
        Machine("qemu", kernel=kernel, disks=[img], cpus=99)
    with pytest.raises(MicrovmError, match="bad boot_timeout -1"):
        Machine("qemu", kernel=kernel, disks=[img], boot_timeout=-1)
    m = Machine("qemu", kernel=kernel, disks=[img])
    with pytest.raises(MicrovmError, match="not started"):
        _ = m.agent
    m.kill()
    # a backend that cannot run: typed error, and the rundir we made is gone
    from microvm.backends import QemuBackend
    from microvm.errors import BackendUnavailable

    m = Machine(QemuBackend(qemu=str(tmp_path / "no-qemu")), kernel=kernel, disks=[img])
    with pytest.raises(BackendUnavailable):
        m.start()
    assert not m.rundir.exists()


def test_guest_panic_is_boot_error_with_console_tail(kernel: Kernel, tmp_path: Path) -> None:
    """A root disk that is not a filesystem: the kernel panics, QEMU exits, BootError has the panic."""
    require_binaries("qemu-system-x86_64")
    _need_agent_client()
    img = tmp_path / "zeros.img"
    img.write_bytes(b"\0" * (1 << 20))
    m = Machine("qemu", kernel=kernel, disks=[Disk(img)], memory=256, boot_timeout=45)
    with pytest.raises(BootError) as ei:
        m.start()
    assert "Kernel panic" in ei.value.console_tail
    assert "VFS" in ei.value.console_tail
    assert "Kernel panic" in str(ei.value)
    assert m.handle.poll() is not None
    assert not m.rundir.exists()


def test_no_agent_times_out_as_boot_error(kernel: Kernel, init_disk: Path) -> None:
    """PID 1 that never speaks the protocol: BootError after boot_timeout, VMM killed."""
    require_binaries("qemu-system-x86_64")
    _need_agent_client()
    m = Machine("qemu", kernel=kernel, disks=[init_disk], memory=256, boot_timeout=5,
                cmdline_extra="hang")  # fmt: skip
    with pytest.raises(BootError) as ei:
        m.start()
    assert "HANGING" in ei.value.console_tail
    pid = m.handle.pid
    assert m.handle.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_async_machine(kernel: Kernel, busybox_root: Path, tmp_path: Path) -> None:
    """astart/aagent/ashutdown: the asyncio path boots, runs, and reports the acked exit code."""
    import asyncio

    from microvm import build_ext4
    from microvm.agent import agent_binary

    require_binaries("qemu-system-x86_64")
    img = build_ext4(busybox_root, tmp_path / "root.img", agent=agent_binary())

    async def go() -> tuple[bytes, int | None, int | None, Path]:
        m = Machine("qemu", kernel=kernel, disks=[img], memory=256)
        async with m:
            r = await m.aagent.exec("/bin/sh", ["-c", "echo async-ok"])
            code = await m.ashutdown(exit_code=4)
        return r.stdout, code, m.exit_code, m.rundir

    out, code, acked, rundir = asyncio.run(go())
    assert out == b"async-ok\n" and code == 0 and acked == 4
    assert not rundir.exists()
