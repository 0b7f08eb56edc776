"""A small independent HTTPS/1.1 upstream for tls_proxy tests and benchmarks.

Routes: ``/bytes/N`` (N bytes, Content-Length), ``/chunked/N`` (N bytes, chunked),
``/ws`` (``101`` upgrade then raw echo), anything else echoes the request as JSON:
``{"method", "target", "headers": [[k, v], ...], "body_len", "body", "sha256", "sni"}``.
Keep-alive and pipelining are supported. It does not use tls_proxy's own parser.

Run alone: ``python -m benchmarks._tls_proxy_upstream --cert C --key K --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import ssl
import threading
from typing import Any


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> tuple[int, str, bytes]:
    h = hashlib.sha256()
    total = 0
    keep = bytearray()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            h.update(data)
            total += size
            if len(keep) < 65536:
                keep += data[: 65536 - len(keep)]
    elif "content-length" in headers:
        n = int(headers["content-length"])
        while n:
            data = await reader.read(min(n, 65536))
            if not data:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(data)
            h.update(data)
            total += len(data)
            if len(keep) < 65536:
                keep += data[: 65536 - len(keep)]
    return total, h.hexdigest(), bytes(keep)


async def _handle_h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     sni: str | None) -> None:
    """HTTP/2 echo: each stream gets JSON of its headers and body (``/bytes/N``: N bytes)."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                header_encoding="latin-1"))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    reqs: dict[int, dict[str, Any]] = {}
    pending: dict[int, bytes] = {}

    def flush_pending() -> None:
        for sid in list(pending):
            data = pending[sid]
            while data:
                room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if room <= 0:
                    break
                conn.send_data(sid, data[:room])
                data = data[room:]
            if data:
                pending[sid] = data
            else:
                del pending[sid]
                conn.end_stream(sid)

    try:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    reqs[ev.stream_id] = {"headers": [list(h) for h in ev.headers],
                                          "body": bytearray()}
                elif isinstance(ev, h2.events.DataReceived):
                    reqs[ev.stream_id]["body"] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    r = reqs.pop(ev.stream_id)
                    path = dict(r["headers"]).get(":path", "")
                    if path.startswith("/bytes/"):
                        body = b"x" * int(path.split("/")[2])
                        ctype = "application/octet-stream"
                    else:
                        body = json.dumps({
                            "headers": r["headers"], "body": r["body"].decode("latin-1"),
                            "body_len": len(r["body"]), "sni": sni, "alpn": "h2",
                            "sha256": hashlib.sha256(r["body"]).hexdigest(),
                        }).encode()
                        ctype = "application/json"
                    conn.send_headers(ev.stream_id, [(":status", "200"),
                                                     ("content-type", ctype),
                                                     ("content-length", str(len(body)))])
                    pending[ev.stream_id] = body
                elif isinstance(ev, h2.events.StreamReset):
                    reqs.pop(ev.stream_id, None)
                    pending.pop(ev.stream_id, None)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    return
            flush_pending()
            writer.write(conn.data_to_send())
            await writer.drain()
    except (ConnectionError, OSError, KeyError):
        return
    finally:
        writer.close()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sslobj = writer.get_extra_info("ssl_object")
    sni = getattr(sslobj, "sni_name", None) if sslobj else None
    if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
        await _handle_h2(reader, writer, sni)
        return
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            lines = head[:-4].decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            pairs = [ln.split(":", 1) for ln in lines[1:]]
            hdrs = [[k, v.strip()] for k, v in pairs]
            lower = {k.lower(): v for k, v in hdrs}
            if lower.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            total, digest, keep = await _read_body(reader, lower)
            close = lower.get("connection", "").lower() == "close" or target == "/close"
            extra = b"Connection: close\r\n" if close else b""
            if target.startswith("/bytes/"):
                n = int(target.split("/")[2])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (n, extra))
                block = b"x" * 65536
                while n:
                    k = min(n, len(block))
                    writer.write(block[:k])
                    n -= k
                    await writer.drain()
            elif target.startswith("/chunked/"):
                n = int(target.split("/")[2])
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n%s\r\n" % extra)
                while n:
                    k = min(n, 30000)
                    writer.write(b"%x\r\n%s\r\n" % (k, b"y" * k))
                    n -= k
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            elif target == "/ws":
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                             b"Connection: Upgrade\r\n\r\n")
                while True:
                    data = await reader.read(65536)
                    if not data:
                        return
                    writer.write(data)
                    await writer.drain()
            else:
                body = json.dumps({
                    "method": method, "target": target, "headers": hdrs, "body_len": total,
                    "body": keep.decode("latin-1"), "sha256": digest, "sni": sni,
                }).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))
            await writer.drain()
            if close:
                return
    except (ConnectionError, OSError, ValueError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


def record_sni(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Make ``ctx`` remember the client's SNI on the SSL object (``sni_name``)."""

    def cb(obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _c: ssl.SSLContext) -> None:
        obj.sni_name = name  # type: ignore[union-attr]

    ctx.sni_callback = cb
    return ctx


def server_context(cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """A server context from PEM files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_pem, key_pem)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class UpstreamThread:
    """Runs the upstream on 127.0.0.1 in a daemon thread; ``port`` is set after ``start``."""

    def __init__(self, ctx: ssl.SSLContext | None, host: str = "127.0.0.1",
                 h2: bool = False) -> None:
        self.ctx = record_sni(ctx) if ctx else None
        if self.ctx is not None:
            self.ctx.set_alpn_protocols(["h2", "http/1.1"] if h2 else ["http/1.1"])
        self.host = host
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._server = await asyncio.start_server(_handle, self.host, 0, ssl=self.ctx,
                                                      limit=1 << 20)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def start(self) -> UpstreamThread:
        self.thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        def _stop() -> None:
            self._server.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(_stop)
        self.thread.join(5)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    a = p.parse_args()

    async def run() -> None:
        srv = await asyncio.start_server(_handle, a.host, a.port,
                                         ssl=server_context(a.cert, a.key), limit=1 << 20)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await srv.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
