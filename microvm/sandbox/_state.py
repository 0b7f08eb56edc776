"""``StateDB``: which sandboxes exist and in which state (SQLite, WAL) at
``$MICROVM_HOME/sandboxes.db``.

The supervisor of a sandbox writes its transitions (``created`` -> ``running`` ->
``stopped`` | ``crashed``); any reader that finds a sandbox ``running`` (or
``created``) whose supervisor is gone (its pid dead, or reused by another program:
the record keeps the pid's start time) marks it ``crashed`` on the spot, so a dead
sandbox never shows as a phantom ``running``.

Example::

    >>> import tempfile, pathlib
    >>> db = StateDB(pathlib.Path(tempfile.mkdtemp()) / "sandboxes.db")
    >>> db.insert("web", config_json="{}", labels={"team": "a"}, sandbox_dir="/tmp/web")
    >>> db.get("web").state, [r.name for r in db.list(labels={"team": "a"})]
    ('created', ['web'])
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from microvm.errors import SandboxError, SandboxExists, SandboxNotFound
from rootfs import microvm_home, process_start_time

__all__ = ["SandboxRecord", "State", "StateDB", "pid_start_time", "process_alive"]

State = Literal["created", "running", "stopped", "crashed"]
STATES: tuple[State, ...] = ("created", "running", "stopped", "crashed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    name TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    pid INTEGER,
    pid_start INTEGER,
    created REAL NOT NULL,
    started REAL,
    stopped REAL,
    labels TEXT NOT NULL,
    dir TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT ''
)
"""


def pid_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``, None if it is gone.

    Example::

        >>> import os
        >>> pid_start_time(os.getpid()) is not None
        True
    """
    return process_start_time(pid)


def process_alive(pid: int | None, start: int | None) -> bool:
    """True when ``pid`` runs and is the same process (same start time) as recorded.

    Example::

        >>> import os
        >>> process_alive(os.getpid(), pid_start_time(os.getpid()))
        True
    """
    if not pid:
        return False
    now = pid_start_time(pid)
    if now is None:
        return False
    if start is not None and now != start:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        # Z: a zombie; X (x): dead, being released. A SIGKILLed multi-threaded process
        # reads Z, then X for a moment, then is gone: both are dead.
        return data[data.rfind(b")") + 2:data.rfind(b")") + 3] not in (b"Z", b"X", b"x")
    except OSError:
        return False


@dataclass(frozen=True)
class SandboxRecord:
    """One row of the state database.

    Example::

        rec = StateDB().get("web")
        print(rec.state, rec.pid, rec.labels)
    """

    name: str
    config_json: str
    state: State
    pid: int | None
    pid_start: int | None
    created: float
    started: float | None
    stopped: float | None
    labels: dict[str, str]
    sandbox_dir: Path
    error: str

    @property
    def supervisor_alive(self) -> bool:
        """Is the recorded supervisor process still running?

        Example::

            StateDB().get("web").supervisor_alive
        """
        return process_alive(self.pid, self.pid_start)


class StateDB:
    """The sandbox table in ``path`` (default ``$MICROVM_HOME/sandboxes.db``).

    Every call opens its own short connection, so one ``StateDB`` may be used from any
    thread, and any number of processes share the file (WAL, busy timeout 10 s).

    Example::

        db = StateDB()
        for rec in db.list():
            print(rec.name, rec.state)
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or microvm_home() / "sandboxes.db"
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise SandboxError(f"{self.path.parent} is not a directory (check MICROVM_HOME)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._db() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise SandboxError(f"cannot open the sandbox database {self.path}: {e}") from None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _row(row: tuple[object, ...]) -> SandboxRecord:
        (name, config, state, pid, pid_start, created, started, stopped, labels, sdir,
         error) = row
        return SandboxRecord(str(name), str(config), state, pid, pid_start,  # type: ignore[arg-type]
                             float(created), started, stopped,  # type: ignore[arg-type]
                             json.loads(str(labels)), Path(str(sdir)), str(error))

    def insert(self, name: str, *, config_json: str, labels: Mapping[str, str],
               sandbox_dir: str | Path) -> None:
        """Add a sandbox in state ``created``; :class:`SandboxExists` if the name is taken.

        Example::

            db.insert("web", config_json=cfg.to_json(), labels={}, sandbox_dir=d)
        """
        try:
            with self._db() as db:
                db.execute(
                    "INSERT INTO sandboxes (name, config, state, created, labels, dir) "
                    "VALUES (?, ?, 'created', ?, ?, ?)",
                    (name, config_json, time.time(), json.dumps(dict(labels)), str(sandbox_dir)))
        except sqlite3.IntegrityError:
            raise SandboxExists(f"a sandbox named {name!r} already exists "
                                f"(pass replace=True, or remove it first)") from None

    def get(self, name: str, *, refresh: bool = True) -> SandboxRecord:
        """The record of ``name`` (:class:`SandboxNotFound` if none); with ``refresh``, a
        ``running``/``created`` sandbox whose supervisor is dead is marked ``crashed`` first.

        Example::

            rec = db.get("web")
        """
        with self._db() as db:
            row = db.execute("SELECT * FROM sandboxes WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise SandboxNotFound(f"no sandbox named {name!r}")
        rec = self._row(row)
        if refresh:
            rec = self._refresh(rec)
        return rec

    def _refresh(self, rec: SandboxRecord) -> SandboxRecord:
        if rec.state in ("running", "created") and rec.pid and not rec.supervisor_alive:
            tail = ""
            console = rec.sandbox_dir / "run" / "console.log"
            if console.exists():
                from microvm.backends.base import console_tail

                tail = console_tail(console, 20)
            self.set_state(rec.name, "crashed", error=f"the supervisor (pid {rec.pid}) died"
                           + (f"; guest console tail:\n{tail}" if tail else ""),
                           only_if=("running", "created"))
            return self.get(rec.name, refresh=False)
        return rec

    def list(self, labels: Mapping[str, str] | None = None) -> list[SandboxRecord]:
        """Every sandbox (refreshed), optionally only those carrying all ``labels``.

        Example::

            [r.name for r in db.list(labels={"team": "a"})]
        """
        with self._db() as db:
            rows = db.execute("SELECT * FROM sandboxes ORDER BY created").fetchall()
        out = [self._refresh(self._row(r)) for r in rows]
        if labels:
            out = [r for r in out if all(r.labels.get(k) == v for k, v in labels.items())]
        return out

    def set_state(self, name: str, state: State, *, pid: int | None = None,
                  error: str | None = None,
                  only_if: tuple[State, ...] | None = None) -> bool:
        """Move ``name`` to ``state`` (``running`` records ``pid`` and its start time).

        With ``only_if``, only from one of those states. Returns whether a row changed.

        Example::

            db.set_state("web", "running", pid=os.getpid())
        """
        if state not in STATES:
            raise SandboxError(f"bad state {state!r}")
        now = time.time()
        sets = ["state = ?"]
        args: list[object] = [state]
        if pid is not None:
            sets += ["pid = ?", "pid_start = ?"]
            args += [pid, pid_start_time(pid)]
        if state == "running":
            sets.append("started = ?")
            args.append(now)
            sets.append("error = ''")
        if state in ("stopped", "crashed"):
            sets.append("stopped = ?")
            args.append(now)
        if error is not None:
            sets.append("error = ?")
            args.append(error)
        where = "name = ?"
        args.append(name)
        if only_if:
            where += f" AND state IN ({', '.join('?' * len(only_if))})"
            args += list(only_if)
        with self._db() as db:
            cur = db.execute(f"UPDATE sandboxes SET {', '.join(sets)} WHERE {where}", args)
            return cur.rowcount > 0

    def set_pid(self, name: str, pid: int) -> None:
        """Record the supervisor's pid (and start time) before it reports ``running``.

        Example::

            db.set_pid("web", proc.pid)
        """
        with self._db() as db:
            db.execute("UPDATE sandboxes SET pid = ?, pid_start = ? WHERE name = ?",
                       (pid, pid_start_time(pid), name))

    def delete(self, name: str) -> None:
        """Forget ``name`` (no error if it is already gone).

        Example::

            db.delete("web")
        """
        with self._db() as db:
            db.execute("DELETE FROM sandboxes WHERE name = ?", (name,))
