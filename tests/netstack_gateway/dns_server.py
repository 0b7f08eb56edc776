"""A small authoritative DNS server for tests (dnspython messages, UDP + TCP, in a thread).

Serves a zone given as master-file text with absolute names (``name ttl IN type rdata``
lines). Follows CNAME chains inside the zone (like an
authoritative server with the targets in-zone), answers NXDOMAIN for unknown names,
and has knobs for misbehaviour: ``rcode`` (answer every query with e.g. SERVFAIL),
``blackhole`` (never answer), ``truncate_udp`` (answer UDP with TC=1 and no records).
Counts the queries it received in ``queries``.

Runnable as a script (for a network namespace)::

    python3 -m tests.netstack_gateway.dns_server --address 198.51.100.53 --zone-file Z
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import struct
import threading
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

ZONE = """
a.example.test.       300 IN A     93.184.216.34
c1.example.test.      100 IN CNAME c2.example.test.
c2.example.test.       50 IN CNAME a.example.test.
v6.example.test.      120 IN AAAA  2606:4700::6810:84e5
rebind.example.test.   30 IN A     10.0.0.5
loop.example.test.     30 IN A     127.0.0.1
mixed.example.test.    30 IN A     93.184.216.35
mixed.example.test.    30 IN A     192.168.1.9
""" + "".join(f"big.example.test. 60 IN A 93.184.{i // 250}.{i % 250 + 1}\n" for i in range(60))


class AuthServer:
    """Authoritative server on ``address``:``port`` (0 = any free port), UDP and TCP."""

    def __init__(self, zone: str = ZONE, address: str = "127.0.0.1", port: int = 0, *,
                 rcode: str | None = None, blackhole: bool = False,
                 truncate_udp: bool = False, extra_answer: str | None = None) -> None:
        self.records = _parse_zone(zone)
        self.rcode = rcode
        self.blackhole = blackhole
        self.truncate_udp = truncate_udp
        self.extra = _parse_zone(extra_answer) if extra_answer else []
        self.queries: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        outer = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = outer.answer(data, "udp")
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn = self.request
                conn.settimeout(10)
                try:
                    while True:
                        hdr = _recv(conn, 2)
                        if not hdr:
                            return
                        data = _recv(conn, struct.unpack("!H", hdr)[0])
                        reply = outer.answer(data, "tcp")
                        if reply is None:
                            time.sleep(30)
                            return
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:
                    return

        family = socket.AF_INET6 if ":" in address else socket.AF_INET

        class UdpServer(socketserver.ThreadingUDPServer):
            address_family = family
            daemon_threads = True

        class TcpServer(socketserver.ThreadingTCPServer):
            address_family = family
            daemon_threads = True
            allow_reuse_address = True

        for attempt in range(50):  # port 0: find a port free for both UDP and TCP
            self.udp = UdpServer((address, port), Udp)
            self.port = self.udp.server_address[1]
            try:
                self.tcp = TcpServer((address, self.port), Tcp)
                break
            except OSError:
                self.udp.server_close()
                if port or attempt == 49:
                    raise
        self.address = address
        self.threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True)
                        for s in (self.udp, self.tcp)]
        for t in self.threads:
            t.start()

    @property
    def upstream(self) -> str:
        """``IP:PORT`` for DnsForwarder(upstreams=...)."""
        return f"[{self.address}]:{self.port}" if ":" in self.address \
            else f"{self.address}:{self.port}"

    def answer(self, data: bytes, transport: str) -> bytes | None:
        request = dns.message.from_wire(data)
        question = request.question[0]
        qname = question.name.to_text(omit_final_dot=True).lower()
        qtype = question.rdtype
        with self.lock:
            self.queries.append((qname, dns.rdatatype.to_text(qtype), transport))
        if self.blackhole:
            return None
        reply = dns.message.make_response(request)
        if self.rcode is not None:
            reply.set_rcode(dns.rcode.from_text(self.rcode))
            return reply.to_wire(want_shuffle=False)
        if transport == "udp" and self.truncate_udp:
            reply.flags |= dns.flags.TC
            return reply.to_wire(want_shuffle=False)
        name, seen, found = qname, set(), False
        while name not in seen:
            seen.add(name)
            step = [rr for rr in self.records
                    if rr.name.to_text(omit_final_dot=True).lower() == name]
            if not step:
                break
            found = True
            cname = [rr for rr in step if rr.rdtype == dns.rdatatype.CNAME]
            if cname and qtype != dns.rdatatype.CNAME:
                reply.answer += cname
                name = cname[0][0].target.to_text(omit_final_dot=True).lower()
                continue
            reply.answer += [rr for rr in step if rr.rdtype == qtype]
            break
        reply.answer += self.extra
        if not found:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        reply.flags |= dns.flags.AA
        return reply.to_wire(want_shuffle=False)

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            s.shutdown()
            s.server_close()


def _parse_zone(text: str) -> list[dns.rrset.RRset]:
    """One RRset per (name, type) of ``text``'s ``name ttl IN type rdata`` lines, in file order."""
    sets: dict[tuple[str, str], dns.rrset.RRset] = {}
    for line in text.splitlines():
        words = line.split(";", 1)[0].split(None, 4)
        if not words:
            continue
        name, ttl, rdclass, rdtype, rdata = words
        rr = dns.rrset.from_text(name, int(ttl), rdclass, rdtype, rdata)
        key = (name.lower(), rdtype.upper())
        if key in sets:
            sets[key].union_update(rr)
        else:
            sets[key] = rr
    return list(sets.values())


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return buf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--zone-file")
    args = ap.parse_args()
    zone = ZONE
    if args.zone_file:
        with open(args.zone_file, encoding="utf-8") as f:
            zone = f.read()
    server = AuthServer(zone, args.address, args.port)
    print(f"ready {server.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.close()


if __name__ == "__main__":
    main()
