"""Real TLS ClientHellos for tests (Python ssl via MemoryBIO, and openssl s_client)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess

from netstack import MalformedHello, parse_client_hello


def python_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight Python's ssl (OpenSSL) sends for ``sni``."""
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if sni is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def openssl_hello(sni: str, extra: list[str] | None = None, timeout: float = 10.0) -> bytes:
    """The ClientHello ``openssl s_client`` sends (captured on a loopback listener)."""
    exe = shutil.which("openssl")
    assert exe
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(timeout)
    port = srv.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", sni, *(extra or [])],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn, _ = srv.accept()
        conn.settimeout(timeout)
        buf = b""
        with conn:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
                try:
                    if parse_client_hello(buf).complete:
                        break
                except MalformedHello:
                    break
        return buf
    finally:
        srv.close()
        proc.kill()
        proc.wait(timeout)


def add_extension(hello: bytes, ext_type: int, body: bytes) -> bytes:
    """Append an extension to a single-record ClientHello, fixing every length."""
    assert hello[0] == 0x16 and hello[5] == 1
    hs = hello[9:]
    i = 2 + 32
    i += 1 + hs[i]
    i += 2 + int.from_bytes(hs[i:i + 2], "big")
    i += 1 + hs[i]
    ext_len = int.from_bytes(hs[i:i + 2], "big")
    exts = hs[i + 2:i + 2 + ext_len] + ext_type.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body
    new_hs = hs[:i] + len(exts).to_bytes(2, "big") + exts
    msg = b"\x01" + len(new_hs).to_bytes(3, "big") + new_hs
    return records(msg, 16384, version=hello[1:3])


def records(handshake: bytes, size: int, version: bytes = b"\x03\x01") -> bytes:
    """Frame handshake bytes into TLS records of at most ``size`` bytes each."""
    out = b""
    for k in range(0, len(handshake), size):
        part = handshake[k:k + size]
        out += b"\x16" + version + len(part).to_bytes(2, "big") + part
    return out


def handshake_bytes(hello: bytes) -> bytes:
    """The handshake message of a single-record hello."""
    n = int.from_bytes(hello[3:5], "big")
    return hello[5:5 + n]


def example_hello() -> bytes:
    """A minimal TLS 1.2-style ClientHello with SNI example.com and ALPN h2, http/1.1."""
    sni_name = b"example.com"
    sni = b"\x00" + len(sni_name).to_bytes(2, "big") + sni_name
    sni_ext = b"\x00\x00" + (len(sni) + 2).to_bytes(2, "big") + len(sni).to_bytes(2, "big") + sni
    protos = b"".join(bytes([len(p)]) + p for p in (b"h2", b"http/1.1"))
    alpn_ext = (b"\x00\x10" + (len(protos) + 2).to_bytes(2, "big")
                + len(protos).to_bytes(2, "big") + protos)
    exts = sni_ext + alpn_ext
    body = (b"\x03\x03" + b"\x11" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(exts).to_bytes(2, "big") + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


EXAMPLE_HELLO = example_hello()
"""A fixed ClientHello: SNI example.com, ALPN h2 and http/1.1."""
