"""A hostile-but-legal HTTPS upstream for the violation tests: it never helps the proxy.

It reads whatever arrives and never answers a request, never closes, and never answers
a TLS close_notify (a blocking ``ssl`` socket does not), so a proxy that waits for the
upstream before answering a blocked request would leave its client hanging.

Paths: ``/early`` sends a final response head (and a little of a larger body) as soon
as the request head arrives, so the response has started before the body is sent;
anything else gets no response at all. HTTP/1.1 and HTTP/2 (ALPN ``h2``).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading

import h2.config
import h2.connection
import h2.events


class StallUpstream:
    """Serves on 127.0.0.1 in threads; ``port`` is set once constructed; ``close()`` ends it."""

    def __init__(self, ctx: ssl.SSLContext, h2_enabled: bool = False) -> None:
        ctx.set_alpn_protocols(["h2", "http/1.1"] if h2_enabled else ["http/1.1"])
        self.ctx = ctx
        self.h2 = h2_enabled
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.lsock.getsockname()[1])
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.requests = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                raw, _ = self.lsock.accept()
            except OSError:
                return
            self.conns.append(raw)
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            s = self.ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            return
        self.conns.append(s)
        try:
            if s.selected_alpn_protocol() == "h2":
                self._serve_h2(s)
            else:
                self._serve_h1(s)
        except (OSError, ssl.SSLError, h2.exceptions.H2Error):
            pass
        # hold the connection open, silent, until the test ends
        self.stop.wait()

    def _serve_h1(self, s: ssl.SSLSocket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = s.recv(65536)
            if not d:
                return
            buf += d
        self.requests += 1
        if buf.split(b" ", 2)[1] == b"/early":
            s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"e" * 10)
        while s.recv(65536):  # swallow the body; never answer, never close
            pass

    def _serve_h2(self, s: ssl.SSLSocket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        while True:
            d = s.recv(65536)
            if not d:
                return
            for ev in conn.receive_data(d):
                if isinstance(ev, h2.events.RequestReceived):
                    self.requests += 1
                    path = dict(ev.headers or []).get(b":path", b"")
                    if path == b"/early":
                        conn.send_headers(ev.stream_id, [(":status", "200"),
                                                         ("content-length", "100000")])
                        conn.send_data(ev.stream_id, b"e" * 10)
                elif isinstance(ev, h2.events.DataReceived):
                    with contextlib.suppress(h2.exceptions.H2Error):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            s.sendall(conn.data_to_send())

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.lsock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()
        self.thread.join(5)
