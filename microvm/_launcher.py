"""``python -m microvm._launcher SPEC``: build a libkrun context from a JSON spec and enter the VM.

Runs in its own process because ``krun_start_enter`` never returns (libkrun
``_exit``s with the guest's exit code). The guest's ``agent`` console port is
a socketpair; a thread bridges it to a listening unix socket at the spec's
``agent_socket`` so the host client connects exactly as with QEMU. Exit
status: the guest's code, or 125 (with a JSON line on stderr) when setup fails.

Example::

    python -m microvm._launcher /run/vm1/launcher.json
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from microvm.backends._console import ConsoleSink
from microvm.backends._libkrun import COMPAT_NET_FEATURES, Libkrun
from microvm.errors import MicrovmError

__all__ = ["SETUP_FAILED", "AgentBridge", "build_context", "main"]

SETUP_FAILED = 125


def _set_pdeathsig() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


class AgentBridge:
    """Bridge the guest's ``agent`` port (one end of a socketpair) to host clients on a unix socket.

    One client at a time; a single thread reads the guest side for the whole VM
    lifetime and forwards to the current client (bytes the guest writes while no
    client is connected are dropped, as on a disconnected QEMU chardev).

    Example::

        AgentBridge(listener, host_end).start()
    """

    def __init__(self, listener: socket.socket, guest: socket.socket) -> None:
        self.listener = listener
        self.guest = guest
        self._conn: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the accept loop and the guest reader (daemon threads).

        Example::

            bridge.start()
        """
        threading.Thread(target=self._guest_to_host, daemon=True).start()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _guest_to_host(self) -> None:
        while True:
            try:
                data = self.guest.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                conn = self._conn
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(data)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._conn = conn
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    self.guest.sendall(data)
            except OSError:
                pass
            with self._lock:
                self._conn = None
            with contextlib.suppress(OSError):
                conn.close()


def build_context(
    krun: Libkrun, cfg: dict[str, Any], console_fd: int, agent_fd: int, root_dir: str
) -> int:
    """Issue every ``krun_*`` call for ``cfg`` (in a fixed, tested order); return the ctx id.

    Example::

        ctx = build_context(Libkrun.open(), cfg, console_fd, agent_fd, "/tmp/empty")
        krun.call("krun_start_enter", ctx)
    """
    krun.call("krun_set_log_level", int(cfg.get("log_level", 0)))
    ctx = krun.create_ctx()
    krun.call("krun_set_vm_config", ctx, int(cfg["cpus"]), int(cfg["memory_mib"]))
    # libkrunfw's cmdline is fixed (virtio-fs root + init.krun): boot from an empty
    # virtio-fs root, let init.krun remount /dev/vda as / and exec our agent as PID 1.
    krun.call("krun_set_root", ctx, root_dir)
    for i, d in enumerate(cfg["disks"]):
        krun.call("krun_add_disk", ctx, f"vd{chr(ord('a') + i)}", d["path"], bool(d["readonly"]))
    krun.call("krun_set_root_disk_remount", ctx, "/dev/vda", None, None)
    for s in cfg.get("shares", []):
        krun.call("krun_add_virtiofs", ctx, s["tag"], s["path"])
    if cfg.get("net_socket"):
        mac = _mac_bytes(cfg["mac"])
        krun.call(
            "krun_add_net_unixstream", ctx, cfg["net_socket"], -1, mac, COMPAT_NET_FEATURES, 0
        )
    # No implicit vsock: with it libkrun gives a net-less guest TSI, i.e. the host's own
    # network, bypassing the policy-enforcing gateway.
    krun.call("krun_disable_implicit_vsock", ctx)
    krun.call("krun_disable_implicit_console", ctx)
    cid = krun.call("krun_add_virtio_console_multiport", ctx)
    devnull = os.open(os.devnull, os.O_RDONLY)
    krun.call("krun_add_console_port_inout", ctx, cid, "console", devnull, console_fd)
    krun.call("krun_add_console_port_inout", ctx, cid, "agent", agent_fd, agent_fd)
    krun.call("krun_set_kernel_console", ctx, "hvc0")
    krun.call("krun_set_exec", ctx, cfg["init"], [], ["KRUN_INIT_PID1=1"])
    return ctx


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m microvm._launcher SPEC.json``.

    Example::

        sys.exit(main(["/run/vm1/launcher.json"]))
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m microvm._launcher SPEC.json", file=sys.stderr)
        return 2
    _set_pdeathsig()
    try:
        cfg = json.loads(Path(args[0]).read_text())
        krun = Libkrun.open(cfg.get("library"))
        # The console goes through a capped sink (a guest cannot fill the host disk). The
        # backend runs it in the parent (it outlives our _exit); standalone, we run our own.
        if "console_socket" in cfg:
            console_path = Path(cfg["console_socket"])
        else:
            console_path = ConsoleSink(
                Path(cfg["rundir"]) / "console.sock",
                Path(cfg["console_log"]),
                int(cfg["console_limit"]),
            ).sock_path
        console_end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console_end.connect(str(console_path))
        console_fd = console_end.fileno()
        guest_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sock_path = cfg["agent_socket"]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sock_path)
        listener.listen(1)
        AgentBridge(listener, host_end).start()
        root_dir = tempfile.mkdtemp(prefix="krun-root-", dir=cfg.get("rundir"))
        ctx = build_context(krun, cfg, console_fd, guest_end.fileno(), root_dir)
        krun.call("krun_start_enter", ctx)
        raise MicrovmError("krun_start_enter returned without starting the VM")
    except (MicrovmError, OSError, KeyError, ValueError) as e:
        print(json.dumps({"error": str(e), "type": type(e).__name__}), file=sys.stderr, flush=True)
        return SETUP_FAILED


if __name__ == "__main__":
    sys.exit(main())
