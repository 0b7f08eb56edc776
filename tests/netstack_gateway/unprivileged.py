"""The rootless side of a gateway test rig, run as an unprivileged user.

:class:`UnprivilegedGateways` starts this module as ``nobody`` (``tests.support.
unprivileged_argv``) with the gateway's end of the VMM socket and, optionally, the VMM
stand-in's ends (its socket and the guest namespace's TAP fd, opened by root: the frame
pump then runs as nobody too); the server process owns a
:class:`~netstack.gateway.PasstUplink` (passt as nobody too) and builds
:class:`~netstack.gateway.Gateway` objects on request; :class:`RemoteGateway` is a handle on one with the part of the
Gateway API the end-to-end scenarios use (``stats``, ``rule_counters``, ``guest_config``,
``published``, ``intercept_tls``, ``close``/``closed``, a context manager) plus a TLS
proxy on ``tls_interception()``, run in the same unprivileged process. Exceptions raised
there (e.g. :class:`~netstack.errors.GatewayError`) are raised again here. Requests and
answers are pickled over a socket pair (both ends are this test suite's code).

The topology (guest and upstream namespaces, their servers, the TAP) stays root's.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj)
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            raise EOFError("the unprivileged gateway process hung up")
        head += chunk
    n = struct.unpack("!I", head)[0]
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the unprivileged gateway process hung up")
        buf += chunk
    return pickle.loads(bytes(buf))  # our own process, our own messages


class UnprivilegedGateways:
    """The server process (as ``uid``), its passt uplink for ``slot``, and a control
    channel. ``workdir``: a directory the unprivileged user owns (pcap files, the TLS
    proxy's CA)."""

    def __init__(self, slot: int, guest_fd: int, *, host_loopback: bool,
                 dns_upstreams: list[str], vmm: tuple[int, int] | None = None) -> None:
        from tests.support import NOBODY, NOGROUP, unprivileged_argv

        self.uid = NOBODY
        self.workdir = Path(tempfile.mkdtemp(prefix="gw-unpriv-"))
        os.chown(self.workdir, NOBODY, NOGROUP)
        ours, theirs = socket.socketpair()
        env = {**os.environ, "HOME": str(self.workdir), "TMPDIR": str(self.workdir),
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}
        pump = f"{vmm[0]},{vmm[1]}" if vmm is not None else "-"
        argv = unprivileged_argv([sys.executable, "-m", "tests.netstack_gateway.unprivileged",
                                  str(theirs.fileno()), str(guest_fd), str(slot),
                                  "1" if host_loopback else "0", ",".join(dns_upstreams),
                                  pump])
        self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(), guest_fd,
                                                     *(vmm or ())), cwd=ROOT,
                                     env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._sock = ours
        self._lock = threading.Lock()
        try:
            self.info: dict[str, Any] = self.call("info")
        except BaseException:
            self.close()
            raise

    def call(self, *request: object) -> Any:
        """One request; the answer, or the server's exception raised here."""
        with self._lock:
            _send(self._sock, request)
            ok, value = _recv(self._sock)
        if not ok:
            raise value
        return value

    def gateway(self, policy: Any, **kw: Any) -> RemoteGateway:
        """A Gateway in the server (same arguments as ``Gateway`` but ``uplink``)."""
        return RemoteGateway(self, self.call("gateway", policy, kw))

    def close(self) -> None:
        """Stop the server (its gateways and passt go with it) and remove the workdir."""
        try:
            if self.proc.poll() is None:
                try:
                    self.call("exit")
                except (EOFError, OSError):
                    pass
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            self._sock.close()
            shutil.rmtree(self.workdir, ignore_errors=True)


class RemoteGateway:
    """A handle on one gateway of the unprivileged server."""

    def __init__(self, server: UnprivilegedGateways, gid: int) -> None:
        self._server, self._gid = server, gid

    def _call(self, name: str, *args: Any, **kw: Any) -> Any:
        return self._server.call("call", self._gid, name, args, kw)

    def stats(self) -> dict[str, Any]:
        return dict(self._call("stats"))

    def rule_counters(self) -> list[Any]:
        return list(self._call("rule_counters"))

    def guest_config(self) -> dict[str, Any]:
        return dict(self._call("guest_config"))

    def intercept_tls(self, ports: Any) -> None:
        self._call("intercept_tls", ports)

    def tls_interception(self, ports: Any) -> None:
        self._call("tls_interception", ports)

    @property
    def published(self) -> dict[int, int]:
        return dict(self._server.call("attr", self._gid, "published"))

    @property
    def closed(self) -> bool:
        return bool(self._server.call("attr", self._gid, "closed"))

    def start_tls_proxy(self, secret: tuple[str, str, str], upstream_ca: bytes,
                        no_verify: list[str]) -> str:
        """A TlsProxy on this gateway's tls_interception([443]) in the server; the path
        of its CA certificate (readable by root)."""
        return str(self._server.call("tls_proxy", self._gid, secret, upstream_ca, no_verify))

    def stop_tls_proxy(self) -> None:
        self._server.call("tls_proxy_close", self._gid)

    def close(self) -> None:
        self._call("close")

    def __enter__(self) -> RemoteGateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the server ----------------------------------------------------------------------------
class _Proxy:
    def __init__(self, gw: Any, workdir: Path, secret: tuple[str, str, str],
                 upstream_ca: bytes, no_verify: list[str]) -> None:
        from tls_proxy import CertificateAuthority, ProxyConfig, Secret, TlsProxy

        ca_file = workdir / f"upstream-ca-{id(self)}.pem"
        ca_file.write_bytes(upstream_ca)
        self.ca = CertificateAuthority.load_or_create(workdir / f"proxy-ca-{id(self)}")
        name, value, host = secret
        cfg = ProxyConfig(ca=self.ca, secrets=[Secret(name, value, [host])],
                          upstream_ca_files=[str(ca_file)], no_verify=no_verify)
        self.ti = gw.tls_interception([443])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = TlsProxy(cfg)
        for sock in self.ti.sockets:
            asyncio.run_coroutine_threadsafe(
                self.proxy.listen_transparent(sock=sock, lookup=self.ti.lookup),
                self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.ti.close()


def _serve(ctrl: socket.socket, guest_fd: int, slot: int, host_loopback: bool,
           dns: list[str], vmm: tuple[int, int] | None) -> None:
    from netstack.gateway import AddressPlan, Gateway, PasstUplink
    from tests.netstack_gateway.topology import StreamTapPump

    workdir = Path(os.environ["HOME"])
    pump = StreamTapPump(socket.socket(fileno=vmm[0]), vmm[1], "vmm-nobody") \
        if vmm is not None else None
    up = PasstUplink(AddressPlan(slot), host_loopback=host_loopback)
    gateways: dict[int, Any] = {}
    proxies: dict[int, _Proxy] = {}
    try:
        while True:
            try:
                req = _recv(ctrl)
            except EOFError:
                return
            try:
                kind = req[0]
                if kind == "exit":
                    _send(ctrl, (True, None))
                    return
                if kind == "info":
                    value: Any = {"uid": os.geteuid(), "passt_pid": up.pid,
                                  "passt_uid": up.peer_uid, "pump": pump is not None}
                elif kind == "gateway":
                    kw = {"guest_fd": guest_fd, "dns_upstreams": dns, **req[2]}
                    if kw["guest_fd"] is None:
                        del kw["guest_fd"]
                    gw = Gateway(req[1], uplink=up, **kw)
                    value = len(gateways) + 1
                    gateways[value] = gw
                elif kind == "call":
                    _, gid, name, args, kwargs = req
                    if name == "close" and gid in proxies:
                        proxies.pop(gid).close()
                    value = getattr(gateways[gid], name)(*args, **kwargs)
                    if name == "tls_interception":  # sockets do not travel: close them
                        value.close()
                        value = None
                elif kind == "attr":
                    value = getattr(gateways[req[1]], req[2])
                elif kind == "tls_proxy":
                    _, gid, secret, upstream_ca, no_verify = req
                    proxies[gid] = _Proxy(gateways[gid], workdir, secret, upstream_ca,
                                          no_verify)
                    assert proxies[gid].ca.cert_path is not None
                    value = str(proxies[gid].ca.cert_path)
                elif kind == "tls_proxy_close":
                    proxies.pop(req[1]).close()
                    value = None
                else:
                    raise ValueError(f"unknown request {kind!r}")
                _send(ctrl, (True, value))
            except Exception as e:  # the caller gets it
                _send(ctrl, (False, e))
    finally:
        for p in proxies.values():
            p.close()
        for gw in gateways.values():
            gw.close()
        up.close()
        if pump is not None:
            pump.stop()


def main() -> None:
    ctrl_fd, guest_fd, slot, host_loopback, dns, pump = sys.argv[1:7]
    ctrl = socket.socket(fileno=int(ctrl_fd))
    vmm = None if pump == "-" else (int(pump.split(",")[0]), int(pump.split(",")[1]))
    _serve(ctrl, int(guest_fd), int(slot), host_loopback == "1", dns.split(","), vmm)


if __name__ == "__main__":
    main()
