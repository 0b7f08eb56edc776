"""Client helpers for the proxy tests: a raw CONNECT + TLS socket and curl."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from typing import Any


def connect_tunnel(proxy_port: int, host: str, port: int, timeout: float = 10) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(4096)
        if not d:
            raise ConnectionError(f"proxy closed the CONNECT: {buf!r}")
        buf += d
    assert buf.startswith(b"HTTP/1.1 200"), buf
    return s


def tls_tunnel(proxy_port: int, host: str, port: int, cafile: str,
               sni: str | None = None, timeout: float = 10) -> ssl.SSLSocket:
    raw = connect_tunnel(proxy_port, host, port, timeout)
    ctx = ssl.create_default_context(cafile=cafile)
    return ctx.wrap_socket(raw, server_hostname=sni or host)


def read_response(s: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length-framed response from ``s`` (``buf`` carries leftovers)."""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise ConnectionError(f"closed before a response head: {bytes(buf)!r}")
        buf += d
    i = buf.index(b"\r\n\r\n")
    head = bytes(buf[:i]).decode("latin-1").split("\r\n")
    del buf[: i + 4]
    status = int(head[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in head[1:])}
    n = int(hdrs.get("content-length", "0"))
    while len(buf) < n:
        d = s.recv(65536)
        if not d:
            raise ConnectionError("closed inside a body")
        buf += d
    body = bytes(buf[:n])
    del buf[:n]
    return status, hdrs, body


def curl(proxy_port: int, url: str, cafile: str, *args: str) -> tuple[int, Any]:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--proxy", f"http://127.0.0.1:{proxy_port}",
         "--cacert", cafile, "-w", "\n%{http_code}", *args, url],
        capture_output=True, text=True, timeout=30,
    )
    body, _, code = out.stdout.rpartition("\n")
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = body + out.stderr
    return int(code or 0), parsed


def header(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]
