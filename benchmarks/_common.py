"""Helpers the benchmarks share: the ``[--quick]`` command line that prints one JSON
result (:func:`quick_main`), and finding and killing a process tree by a path in its
command lines (:func:`process_tree`, :func:`kill_process_tree`; the fleet benchmark and
tests clean up a Ray cluster so)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def quick_main(doc: str | None, run: Callable[[bool], dict[str, Any]], quick_help: str) -> None:
    """Parse ``[--quick]`` (the description is ``doc``'s first line), call ``run(quick)``
    and print its result as one JSON line.

    Example (a benchmark module's ``main``)::

        def main() -> None:
            quick_main(__doc__, run, "3 rounds")
    """
    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ns = ap.parse_args()
    print(json.dumps(run(ns.quick)))


def cmdline(pid: int) -> str:
    """Process ``pid``'s command line, arguments joined by spaces ("" if it is gone).

    >>> "python" in cmdline(os.getpid()) or "pytest" in cmdline(os.getpid())
    True
    """
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def ppid(pid: int) -> int:
    """Process ``pid``'s parent pid (-1 if it is gone).

    >>> ppid(os.getpid()) == os.getppid()
    True
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_tree(marker: str | Path) -> set[int]:
    """Every process (but this one) whose command line names ``marker`` (e.g. a Ray
    cluster's session directory), and all their descendants.

    >>> process_tree("/no/such/marker/dir")
    set()
    """
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    found = {p for p in pids if str(marker) in cmdline(p) and p != os.getpid()}
    grew = True
    while grew:
        grew = False
        for p in pids:
            if p not in found and ppid(p) in found:
                found.add(p)
                grew = True
    return found


def kill_process_tree(marker: str | Path, rounds: int = 3) -> None:
    """SIGKILL :func:`process_tree` of ``marker`` until it is empty (at most ``rounds``
    times, half a second apart).

    >>> kill_process_tree("/no/such/marker/dir")
    """
    for _ in range(rounds):
        pids = process_tree(marker)
        if not pids:
            break
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.5)

