"""Run gateway tests against the ASan+UBSan build of ``netstack._fastpath`` (leak check on).

    python3 -m tests.netstack_gateway.run_under_asan [pytest args]
    # default: tests/netstack_gateway/test_gateway_loop.py

Builds the sanitizer variant into ``build/asan/`` if stale (clang), re-executes Python
with the ASan runtime preloaded and ``detect_leaks=1``, loads that build as
``netstack._fastpath`` and runs pytest in-process; exits non-zero on any report.
"""

from __future__ import annotations

import os
import sys

from tests.fuzz import _netstack_asan as asan


def main() -> int:
    if asan.RUNTIME not in os.environ.get("LD_PRELOAD", ""):
        asan.ensure_runtime()
        asan.ensure_extension()
        env = dict(os.environ, LD_PRELOAD=asan.RUNTIME,
                   ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:symbolize=1",
                   LSAN_OPTIONS="suppressions=" + os.path.join(os.path.dirname(__file__),
                                                               "lsan.supp"),
                   UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
        os.execve(sys.executable, [sys.executable, "-m", "tests.netstack_gateway.run_under_asan",
                                   *sys.argv[1:]], env)
    # the runtime is loaded in this process now; children (ip, nft, curl, sysctl) must
    # not inherit it
    os.environ.pop("LD_PRELOAD", None)
    os.environ.pop("ASAN_OPTIONS", None)
    asan.load_extension()
    import pytest

    args = sys.argv[1:] or ["-q", "-p", "no:cacheprovider",
                            "tests/netstack_gateway/test_gateway_loop.py"]
    return int(pytest.main(args))


if __name__ == "__main__":
    raise SystemExit(main())
