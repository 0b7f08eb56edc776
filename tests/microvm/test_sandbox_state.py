"""``process_alive``: once a process reads dead it never reads alive again.

A SIGKILLed multi-threaded process whose parent ignores SIGCHLD (a supervisor forked by
the zygote) reads ``Z``, then for a moment ``X`` (dead, being released), then is gone.
Reading ``X`` as alive made ``Sandbox.list()`` report a killed supervisor's sandbox as
``running`` right after another reader had seen it dead (seen once in CI).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Runs in its own interpreter: it sets SIGCHLD to SIG_IGN (as the zygote does) and forks,
# which the test process must not do.
_PROBE = textwrap.dedent("""
    import os, signal, sys, threading, time
    from microvm.sandbox._state import process_alive

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # the kernel reaps: as under the zygote
    seen = {}
    for _ in range(int(sys.argv[1])):
        pid = os.fork()
        if pid == 0:
            for _ in range(3):
                threading.Thread(target=lambda: [sum(range(10**5)) for _ in iter(int, 1)],
                                 daemon=True).start()
            time.sleep(100)
            os._exit(0)
        time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        dead_once = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stat = b""
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                pass
            state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3].decode() or "gone"
            seen[state] = seen.get(state, 0) + 1
            alive = process_alive(pid, None)
            if dead_once and alive:
                print(f"pid {pid} read alive (state {state}) after it read dead")
                sys.exit(1)
            dead_once = dead_once or not alive
            if state == "gone":
                break
    print("states seen:", seen)
""")


def test_a_killed_process_never_reads_alive_again() -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE, "150"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "states seen:" in proc.stdout
