"""Records of kernel objects a sandbox uplink created, and cleanup of a crashed owner's.

Every :class:`~netstack.gateway.TapUplink` writes ``$MICROVM_HOME/net/uplinks/<token>.json``
*before* it creates anything, naming its owner (pid + the pid's start time, so a
reused pid is not mistaken for the owner), its network namespace, host links and
host nftables tables. :func:`cleanup_stale` removes the objects of every record
whose owner is dead, then the record.

>>> import tempfile
>>> cleanup_stale(home=tempfile.mkdtemp())
[]
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from netstack.errors import UplinkError
from netstack.gateway._addressing import microvm_home

log = logging.getLogger("netstack.gateway")


def _proc_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # field 22 (starttime); the comm field (2) may contain spaces, so split after ')'
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def process_identity(pid: int | None = None) -> tuple[int, int | None]:
    """``(pid, start time in clock ticks)`` of ``pid`` (default: this process).

    >>> import os; process_identity()[0] == os.getpid()
    True
    """
    pid = os.getpid() if pid is None else pid
    return pid, _proc_start_time(pid)


def owner_alive(pid: int, start_time: int | None) -> bool:
    """Whether the process that wrote a record still runs (same pid *and* start time).

    >>> import os; owner_alive(*process_identity())
    True
    >>> owner_alive(2**22 + 1, None)
    False
    """
    current = _proc_start_time(pid)
    if current is None:
        return False
    return start_time is None or current == start_time


@dataclass
class UplinkRecord:
    """What one uplink owns (names only; all in the host namespace except ``netns``).

    >>> UplinkRecord("web", "abc", 1, None, "microvm-abc").host_links
    []
    """

    sandbox: str
    token: str
    pid: int
    pid_start: int | None
    netns: str
    host_links: list[str] = field(default_factory=list)
    nft_tables: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Serialize (stable key order).

        >>> '"sandbox": "a"' in UplinkRecord("a", "t", 1, 2, "n").to_json()
        True
        """
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UplinkRecord:
        """Parse a record written by :meth:`to_json`; raises UplinkError if malformed.

        >>> UplinkRecord.from_json(UplinkRecord("a", "t", 1, 2, "n").to_json()).netns
        'n'
        """
        try:
            data: Any = json.loads(text)
            return cls(sandbox=str(data["sandbox"]), token=str(data["token"]),
                       pid=int(data["pid"]),
                       pid_start=None if data["pid_start"] is None else int(data["pid_start"]),
                       netns=str(data["netns"]),
                       host_links=[str(x) for x in data["host_links"]],
                       nft_tables=[str(x) for x in data["nft_tables"]])
        except (ValueError, KeyError, TypeError) as e:
            raise UplinkError(f"malformed uplink state record {text[:80]!r}: {e}") from e


def state_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """``<home>/net/uplinks`` (created on demand by writers).

    >>> state_dir("/x").as_posix()
    '/x/net/uplinks'
    """
    return (Path(home) if home is not None else microvm_home()) / "net" / "uplinks"


def write_record(record: UplinkRecord, home: str | os.PathLike[str] | None = None) -> Path:
    """Atomically write ``record`` (temp file + rename); returns its path.

    >>> import tempfile
    >>> write_record(UplinkRecord("a", "t", 1, 2, "n"), tempfile.mkdtemp()).name
    't.json'
    """
    d = state_dir(home)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / f"{record.token}.json"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30,
                          check=False)


def remove_objects(record: UplinkRecord) -> list[str]:
    """Delete the namespace, host links and host nft tables of ``record``; missing ones
    are fine. Returns what was actually removed (e.g. ``["netns microvm-x"]``).

    >>> remove_objects(UplinkRecord("a", "doc0", 1, 2, "microvm-nonexistent-doc"))
    []
    """
    from pyroute2 import IPRoute, netns

    removed: list[str] = []
    for table in record.nft_tables:
        family, _, name = table.partition(" ")
        r = _run(["nft", "delete", "table", family, name])
        if r.returncode == 0:
            removed.append(f"nft table {table}")
    with IPRoute() as ipr:
        for link in record.host_links:
            idx = ipr.link_lookup(ifname=link)
            if idx:
                try:
                    ipr.link("del", index=idx[0])
                    removed.append(f"link {link}")
                except Exception as e:  # already gone with its peer
                    log.debug("link %s vanished during removal: %s", link, e)
    if record.netns in netns.listnetns():
        try:
            netns.remove(record.netns)
            removed.append(f"netns {record.netns}")
        except OSError as e:  # removed concurrently
            log.debug("netns %s vanished during removal: %s", record.netns, e)
    return removed


def cleanup_stale(home: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove the uplink objects of crashed processes (records whose owner is dead).

    Returns a description of each removed object. Records of live owners are left
    alone; unreadable records are reported in the log and skipped.

    >>> import tempfile
    >>> cleanup_stale(home=tempfile.mkdtemp())
    []
    """
    d = state_dir(home)
    if not d.is_dir():
        return []
    removed: list[str] = []
    # one cleaner at a time (two would race on the same records)
    with FileLock(str(d / ".cleanup.lock")):   # the same flock on the same file as before
        for path in sorted(d.glob("*.json")):
            removed.extend(_cleanup_record(path))
    return removed


def _cleanup_record(path: Path) -> list[str]:
    try:
        record = UplinkRecord.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UplinkError) as e:
        log.warning("skipping unreadable uplink record %s: %s", path, e)
        return []
    if owner_alive(record.pid, record.pid_start):
        return []
    log.info("removing leftovers of sandbox %r (owner pid %d is dead)", record.sandbox,
             record.pid)
    removed = remove_objects(record)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return removed
