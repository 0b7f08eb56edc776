"""HTTP, HTTPS and DNS servers for the "upstream" namespace (run inside it as a script).

    python3 -m tests.netstack_gateway.upstream_servers --ip 198.51.100.10 \
        --dns-ip 198.51.100.53 --cert cert.pem --key key.pem

Prints ``ready`` once all listeners are bound. HTTP(S) answers every GET with
``hello from upstream <path> client=<peer ip>`` (so tests can see the NAT'd source),
and ``/big?n=N`` with N bytes; PUT answers ``got <bytes> <sha256>`` of the body.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import socketserver
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.netstack_gateway.dns_server import AuthServer

ZONE = """
web.upstream.test.     60 IN A     198.51.100.10
alias.upstream.test.   60 IN CNAME web.upstream.test.
web6.upstream.test.    60 IN AAAA  2001:db8:100::10
"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/big":
            n = int(parse_qs(url.query).get("n", ["1000000"])[0])
            body = b"x" * n
        elif url.path == "/auth":  # what reached the upstream (secret injection tests)
            body = f"auth={self.headers.get('Authorization')}\n".encode()
        else:
            body = f"hello from upstream {url.path} client={self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        """Upload sink: answers ``got <bytes> <sha256>``."""
        left = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        n = 0
        while left:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            digest.update(chunk)
            n += len(chunk)
            left -= len(chunk)
        body = f"got {n} {digest.hexdigest()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that would
        # leave the namespace; skip it
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class Server6(Server):
    address_family = socket.AF_INET6


def serve(ip: str, port: int, context: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    server = (Server6 if ":" in ip else Server)((ip, port), Handler)
    server.daemon_threads = True
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    return server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ip", required=True)
    ap.add_argument("--dns-ip", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ip6", help="also serve HTTP on this IPv6 address")
    args = ap.parse_args()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    serve(args.ip, 80)
    serve(args.ip, 443, ctx)
    if args.ip6:
        serve(args.ip6, 80)
    AuthServer(ZONE, args.dns_ip, 53)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
