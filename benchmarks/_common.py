"""Helpers the benchmarks share: the ``[--quick]`` command line that prints one JSON
result (:func:`quick_main`). Process-tree helpers (``process_tree``,
``kill_process_tree``) are in :mod:`tests.support`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
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

