"""A tiny gateway for e2e tests: serves QEMU's ``-netdev stream`` socket (u32-BE length + Ethernet
frame) and answers ARP and ICMP echo for one IPv4 address, counting what it saw."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from pathlib import Path

GW_MAC = bytes.fromhex("020000000001")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class NetPeer:
    """Listen on ``path``; reply to ARP for ``ip`` and to pings sent to it."""

    def __init__(self, path: Path, ip: str = "172.16.0.1") -> None:
        self.path = path
        self.ip = socket.inet_aton(ip)
        self.arp_replies = 0
        self.echo_replies = 0
        self.frames = 0
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(path))
        self._srv.listen(1)
        self._conn: socket.socket | None = None
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._srv.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()

    def _recv_exact(self, c: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = c.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _send(self, frame: bytes) -> None:
        assert self._conn is not None
        self._conn.sendall(struct.pack("!I", len(frame)) + frame)

    def _run(self) -> None:
        try:
            self._conn, _ = self._srv.accept()
            while True:
                (n,) = struct.unpack("!I", self._recv_exact(self._conn, 4))
                self._handle(self._recv_exact(self._conn, n))
        except (OSError, EOFError):
            return

    def _handle(self, f: bytes) -> None:
        self.frames += 1
        if len(f) < 14:
            return
        dst, src, etype = f[:6], f[6:12], struct.unpack("!H", f[12:14])[0]
        if etype == 0x0806 and len(f) >= 42:
            op = struct.unpack("!H", f[20:22])[0]
            spa, tpa = f[28:32], f[38:42]
            if op == 1 and tpa == self.ip:
                arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + GW_MAC + self.ip + src + spa
                self._send(src + GW_MAC + b"\x08\x06" + arp)
                self.arp_replies += 1
        elif etype == 0x0800 and len(f) >= 34:
            ip = f[14:]
            ihl = (ip[0] & 0xF) * 4
            if ip[9] != 1 or ip[16:20] != self.ip:
                return
            total = struct.unpack("!H", ip[2:4])[0]
            icmp = ip[ihl:total]
            if not icmp or icmp[0] != 8:
                return
            reply = b"\x00\x00\x00\x00" + icmp[4:]
            reply = reply[:2] + struct.pack("!H", _csum(reply)) + reply[4:]
            hdr = bytearray(ip[:ihl])
            hdr[12:16], hdr[16:20] = ip[16:20], ip[12:16]
            hdr[8] = 64
            hdr[10:12] = b"\0\0"
            hdr[10:12] = struct.pack("!H", _csum(bytes(hdr)))
            self._send(src + dst + b"\x08\x00" + bytes(hdr) + reply)
            self.echo_replies += 1
