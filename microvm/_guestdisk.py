"""Guest disk images: an ext4 image built from a host directory (``mkfs.ext4 -d``), agent included.

The agent binary lands at ``/.microvm/agent`` (mode 0755, root-owned) and the
mount points the agent needs (``/proc /sys /dev /tmp /run``) are created;
the source directory is never modified.

Example::

    from microvm import build_ext4
    build_ext4(Path("rootfs"), Path("root.img"), agent=Path("microvm/_bin/microvm-agent"))
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from microvm.errors import DiskError
from rootfs import microvm_home

__all__ = ["AGENT_GUEST_PATH", "DiskError", "boot_disk", "build_ext4", "dir_size"]

AGENT_GUEST_PATH = "/.microvm/agent"
MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "run", ".microvm")


def dir_size(path: Path) -> int:
    """Bytes used by regular files and links under ``path`` (no symlink following).

    Example::

        dir_size(Path("rootfs"))
    """
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += max(st.st_size, 4096) if not os.path.isdir(os.path.join(root, name)) else 4096
    return total


def build_ext4(
    source: Path,
    out: Path,
    *,
    agent: Path | None = None,
    size_mib: int | None = None,
    free_mib: int = 64,
    label: str = "microvm-root",
) -> Path:
    """Create ``out`` as an ext4 image holding ``source`` (+ ``agent`` at /.microvm/agent).

    ``size_mib`` defaults to the content size plus ``free_mib`` and 20 % slack.
    Written atomically (temp file + rename). Raises :class:`DiskError`.

    >>> import shutil, tempfile
    >>> from pathlib import Path
    >>> from microvm import build_ext4
    >>> tmp = Path(tempfile.mkdtemp())
    >>> (tmp / "rootfs").mkdir(); _ = (tmp / "rootfs" / "hello").write_text("hi")
    >>> img = build_ext4(tmp / "rootfs", tmp / "root.img", free_mib=8)
    >>> img.stat().st_size > 0
    True
    >>> shutil.rmtree(tmp)

    With the agent: ``build_ext4(Path("rootfs"), out, agent=agent_binary())``.
    """
    if not source.is_dir():
        raise DiskError(f"rootfs source {str(source)!r} is not a directory")
    if agent is not None and not agent.is_file():
        raise DiskError(f"agent binary {str(agent)!r} does not exist")
    mkfs = shutil.which("mkfs.ext4") or (
        "/sbin/mkfs.ext4" if os.path.exists("/sbin/mkfs.ext4") else None
    )
    debugfs = shutil.which("debugfs") or (
        "/sbin/debugfs" if os.path.exists("/sbin/debugfs") else None
    )
    if not mkfs or not debugfs:
        raise DiskError(
            "mkfs.ext4/debugfs not found: install e2fsprogs (Debian/Fedora `e2fsprogs`)"
        )
    if free_mib < 0:
        raise DiskError(f"bad free_mib {free_mib!r}: must be >= 0")
    content = dir_size(source) + (agent.stat().st_size if agent else 0)
    need = (content * 12 // 10) // (1 << 20) + free_mib + 16
    if size_mib is None:
        size_mib = need
    elif size_mib < need - free_mib:
        raise DiskError(
            f"size_mib {size_mib} too small for {str(source)!r}: needs at least {need - free_mib} MiB"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.truncate(tmp, size_mib << 20)
        _run(
            [mkfs, "-q", "-F", "-L", label, "-E", "root_owner=0:0", "-O", "^has_journal",
             "-d", str(source), str(tmp)],
            "mkfs.ext4",
        )  # fmt: skip
        cmds = []
        for mp in MOUNT_POINTS:
            if not (source / mp).exists():
                cmds.append(f"mkdir /{mp}")
        if agent is not None:
            cmds += [
                f"rm {AGENT_GUEST_PATH}",
                f'write "{agent}" {AGENT_GUEST_PATH}',
                f"sif {AGENT_GUEST_PATH} mode 0100755",
                f"sif {AGENT_GUEST_PATH} uid 0",
                f"sif {AGENT_GUEST_PATH} gid 0",
            ]
        if cmds:
            with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as f:
                f.write("\n".join(cmds) + "\n")
                f.flush()
                _run([debugfs, "-w", "-f", f.name, str(tmp)], "debugfs")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise DiskError(
            f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}"
        )


def boot_disk(agent: Path | None = None, cache_dir: Path | None = None) -> Path:
    """A minimal ext4 root holding only the agent (the ``/dev/vda`` that mounts the real root).

    Cached per agent binary (by sha256) under ``$MICROVM_HOME/boot``; copy it before
    booting (a writable disk is locked by its VMM). Example::

        shutil.copy(boot_disk(), rundir / "boot.img")
    """
    import hashlib

    from filelock import FileLock

    if agent is None:
        from microvm.agent import agent_binary

        agent = agent_binary()
    digest = hashlib.sha256(agent.read_bytes()).hexdigest()[:16]
    if cache_dir is None:
        cache_dir = microvm_home() / "boot"
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"agent-{digest}.ext4"
    with FileLock(str(out) + ".lock"):
        if not out.is_file():
            with tempfile.TemporaryDirectory(dir=cache_dir) as empty:
                build_ext4(Path(empty), out, agent=agent, free_mib=8, label="microvm-boot")
    return out
