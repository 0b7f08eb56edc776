"""The proxy: explicit HTTP CONNECT mode and transparent mode, interception or bypass.

Example::

    >>> import asyncio, tempfile
    >>> from tls_proxy import CertificateAuthority, ProxyConfig, Secret, TlsProxy
    >>> async def main():
    ...     ca = CertificateAuthority.load_or_create(tempfile.mkdtemp())
    ...     cfg = ProxyConfig(ca=ca, secrets=[Secret("KEY", "real", ["api.example.com"])])
    ...     async with TlsProxy(cfg) as proxy:
    ...         host, port = await proxy.listen_explicit("127.0.0.1", 0)
    ...         # clients: https_proxy=http://127.0.0.1:<port>, trusting ca.cert_path
    >>> asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import math
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tls_proxy._ca import CertificateAuthority
from tls_proxy._h2session import H2Session
from tls_proxy._hosts import HostList, canonical_host, validate_hostname
from tls_proxy._http1 import parse_head
from tls_proxy._secrets import Secret, SecretPolicy
from tls_proxy._session import Http1Session, SessionLimits, SessionStats, error_response
from tls_proxy._sni import MAX_HELLO, HelloLike, HelloParser, parse_client_hello
from tls_proxy._sockopt import SO_ORIGINAL_DST as SO_ORIGINAL_DST
from tls_proxy._sockopt import original_dst as original_dst
from tls_proxy._streams import BufferedReader, Duplex, TcpStream, TlsServerStream
from tls_proxy._upstream import UpstreamTls
from tls_proxy.errors import ClientHelloError, ConfigError, HttpError

log = logging.getLogger("tls_proxy")

Address = tuple[str, int]
OriginalDst = Callable[[Address, Address], "Address | Awaitable[Address | None] | None"]
"""``lookup(peer, local) -> (ip, port)``: the gateway's answer for a transparent flow."""


@dataclass
class ProxyConfig:
    """Everything a :class:`TlsProxy` needs; all fields but ``ca`` have strict defaults.

    ``bypass`` hosts (exact or ``*.suffix``) are spliced untouched; ``resolve`` maps
    names to IPs (tests, pinned DNS); ``hello_parser`` is the injected ClientHello
    reader (``netstack.parse_client_hello`` behind the gateway).

    Every field is checked at construction (types, ranges, host patterns, addresses,
    CA files), so a wrong value raises :class:`~tls_proxy.errors.ConfigError` here
    instead of failing every connection later.

    Example::

        >>> cfg = ProxyConfig(ca=CertificateAuthority.generate(), bypass=["*.bank.example"])
        >>> cfg.handshake_timeout
        10.0
        >>> ProxyConfig(ca=None)
        Traceback (most recent call last):
        ...
        tls_proxy.errors.ConfigError: ProxyConfig.ca must be a CertificateAuthority (e.g. CertificateAuthority.load_or_create(dir)), got None
    """

    ca: CertificateAuthority
    secrets: Sequence[Secret] = ()
    bypass: Sequence[str] = ()
    upstream_ca_files: Sequence[str] = ()
    scoped_upstream_ca: Mapping[str, str] = field(default_factory=dict)
    no_verify: Sequence[str] = ()
    verify_upstream: bool = True
    resolve: Mapping[str, str] = field(default_factory=dict)
    hello_parser: HelloParser = parse_client_hello
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    header_timeout: float = 30.0
    idle_timeout: float = 300.0
    max_body_buffer: int = 16 * 1024 * 1024
    enforce_authority: bool = True
    max_connect_head: int = 8192
    max_connections: int = 4096
    http2: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.ca, CertificateAuthority):
            raise ConfigError(
                "ProxyConfig.ca must be a CertificateAuthority (e.g. "
                f"CertificateAuthority.load_or_create(dir)), got {_shown(self.ca)}")
        secrets: list[Secret] = []
        for s in _sequence("secrets", self.secrets):
            if not isinstance(s, Secret):
                raise ConfigError(f"ProxyConfig.secrets must hold Secret objects, got {_shown(s)}")
            secrets.append(s)
        SecretPolicy(secrets)  # duplicate env names / placeholders
        for name in ("bypass", "no_verify"):
            for pat in _sequence(name, getattr(self, name)):
                if not isinstance(pat, str):
                    raise ConfigError(
                        f"ProxyConfig.{name} must hold host patterns (str), got {_shown(pat)}")
                HostList([pat])
        for path in _sequence("upstream_ca_files", self.upstream_ca_files):
            if not isinstance(path, str | os.PathLike):
                raise ConfigError("ProxyConfig.upstream_ca_files must hold file paths, got "
                                  f"{_shown(path)}")
        for name, mapping in (("scoped_upstream_ca", self.scoped_upstream_ca),
                              ("resolve", self.resolve)):
            if not isinstance(mapping, Mapping):
                raise ConfigError(f"ProxyConfig.{name} must be a mapping, got {_shown(mapping)}")
            for k, v in mapping.items():
                if not isinstance(k, str) or not isinstance(v, str | os.PathLike):
                    raise ConfigError(f"ProxyConfig.{name} must map host names (str) to "
                                      f"{'IP addresses' if name == 'resolve' else 'file paths'}"
                                      f" (str), got {_shown(k)}: {_shown(v)}")
        for k, v in self.resolve.items():
            try:
                ipaddress.ip_address(str(v))
            except ValueError:
                raise ConfigError(f"invalid --resolve address {v!r} for {k!r}") from None
        if not callable(self.hello_parser):
            raise ConfigError("ProxyConfig.hello_parser must be callable(bytes), got "
                              f"{_shown(self.hello_parser)}")
        for name in ("handshake_timeout", "connect_timeout", "header_timeout", "idle_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (
                    math.isfinite(v) and v > 0):
                raise ConfigError(f"ProxyConfig.{name} must be a finite number of seconds > 0, "
                                  f"got {_shown(v)}")
        for name in ("max_body_buffer", "max_connect_head", "max_connections"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ProxyConfig.{name} must be an integer >= 1, got {_shown(v)}")
        for name in ("verify_upstream", "enforce_authority", "http2"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ConfigError(f"ProxyConfig.{name} must be True or False, got {_shown(v)}")


def _shown(value: object) -> str:
    """A short description of a bad value for an error message (never a secret: a
    :class:`Secret`'s repr hides its value)."""
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__}"


def _sequence(name: str, value: object) -> Sequence[object]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | set | frozenset):
        raise ConfigError(
            f"ProxyConfig.{name} must be a list or tuple, got {_shown(value)}")
    return list(value)


class TlsProxy:
    """Serves explicit (CONNECT) and/or transparent listeners with one configuration.

    Example::

        >>> proxy = TlsProxy(ProxyConfig(ca=CertificateAuthority.generate()))
        >>> proxy.policy.guest_env()
        {}
    """

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.policy = SecretPolicy(config.secrets)
        self.bypass = HostList(config.bypass)
        self.upstream_tls = UpstreamTls(
            config.upstream_ca_files, config.scoped_upstream_ca, config.no_verify,
            config.verify_upstream,
        )
        self.resolve = {canonical_host(k): v for k, v in config.resolve.items()}
        for name, ip in self.resolve.items():
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(f"invalid --resolve address {ip!r} for {name!r}") from None
        self.limits = SessionLimits(
            config.header_timeout, config.idle_timeout, config.max_body_buffer,
            config.enforce_authority,
        )
        self.stats = SessionStats()
        self.connections = 0
        self.bypassed = 0
        self.intercepted = 0
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def update_secrets(self, secrets: Sequence[Secret]) -> None:
        """Swap the secret set (rotation, new hosts); applies to connections opened later.

        Example::

            >>> proxy.update_secrets([Secret("KEY", "rotated", ["api.example.com"])])  # doctest: +SKIP
        """
        self.policy = SecretPolicy(secrets)
        self.config.secrets = tuple(secrets)

    async def __aenter__(self) -> TlsProxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening and cancel every live connection."""
        for s in self._servers:
            s.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2)
        self._servers.clear()

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def listen_explicit(self, host: str, port: int) -> Address:
        """Listen as an HTTP CONNECT proxy; returns the bound (host, port)."""
        srv = await asyncio.start_server(self._explicit, host, port, limit=1 << 20)
        self._servers.append(srv)
        addr = srv.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    async def listen_transparent(
        self, host: str | None = None, port: int = 0, lookup: OriginalDst | None = None,
        *, sock: socket.socket | None = None,
    ) -> Address:
        """Listen for redirected TLS flows; the destination comes from ``lookup`` or
        ``SO_ORIGINAL_DST`` (nftables/iptables ``redirect``). ``sock``: serve an already
        bound, listening socket instead of ``host``/``port`` (e.g. one of the sockets of
        ``netstack.gateway.Gateway.tls_interception()``, served with its ``lookup``).

        Example::

            >>> ti = gateway.tls_interception([443])                            # doctest: +SKIP
            >>> for s in ti.sockets:                                            # doctest: +SKIP
            ...     await proxy.listen_transparent(sock=s, lookup=ti.lookup)
        """

        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self._transparent(r, w, lookup)

        if sock is not None:
            if host is not None:
                raise ConfigError("give either host/port or sock, not both")
            srv = await asyncio.start_server(handler, sock=sock)
        elif host is None:
            raise ConfigError("listen_transparent needs host and port, or sock")
        else:
            srv = await asyncio.start_server(handler, host, port)
        self._servers.append(srv)
        addr = srv.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    # ----- entry points ------------------------------------------------------

    def _admit(self, w: asyncio.StreamWriter) -> bool:
        if len(self._tasks) >= self.config.max_connections:
            log.warning("connection limit %d reached; refusing", self.config.max_connections)
            w.close()
            return False
        self._track()
        self.connections += 1
        return True

    async def _explicit(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not self._admit(w):
            return
        tcp = TcpStream(r, w)
        try:
            br = BufferedReader(tcp)
            try:
                block = await asyncio.wait_for(
                    br.read_until(b"\r\n\r\n", self.config.max_connect_head),
                    self.config.header_timeout,
                )
                if not block:
                    return
                head = parse_head(block, request=True)
            except TimeoutError:
                tcp.send(error_response(408, "bad_request", "CONNECT request not received in time"))
                return
            except HttpError as e:
                tcp.send(error_response(e.status, "bad_request", e.reason))
                return
            if head.method != b"CONNECT":
                tcp.send(error_response(
                    501, "bad_request",
                    "only CONNECT is supported; use https:// URLs through this proxy",
                ))
                return
            try:
                host, port = _split_authority(head.target.decode("latin-1"))
            except ConfigError as e:
                tcp.send(error_response(400, "bad_request", str(e)))
                return
            tcp.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await tcp.drain()
            await self._serve_tls(tcp, bytes(br.buf), host, port, expected_sni=host)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception as e:  # never let one connection take the proxy down
            _internal_error(e)
        finally:
            with contextlib.suppress(Exception):
                await tcp.drain()
            tcp.close()

    async def _transparent(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, lookup: OriginalDst | None
    ) -> None:
        if not self._admit(w):
            return
        tcp = TcpStream(r, w)
        try:
            peer = w.get_extra_info("peername")
            local = w.get_extra_info("sockname")
            dst: Address | None
            if lookup is not None:
                res = lookup((peer[0], peer[1]), (local[0], local[1]))
                dst = await res if inspect.isawaitable(res) else res
            else:
                sock = w.get_extra_info("socket")
                try:
                    dst = original_dst(sock)
                except OSError:
                    dst = None
            if dst is None:
                log.warning("transparent flow from %s without an original destination", peer)
                return
            await self._serve_tls(tcp, b"", dst[0], dst[1], expected_sni=None)
        except (ConnectionError, OSError):
            pass
        except Exception as e:  # never let one connection take the proxy down
            _internal_error(e)
        finally:
            tcp.close()

    # ----- TLS ---------------------------------------------------------------

    async def _read_hello(self, tcp: TcpStream, first: bytes) -> tuple[HelloLike, bytes] | None:
        buf = bytearray(first)

        async def run() -> HelloLike | None:
            while True:
                if buf:
                    hello = self.config.hello_parser(bytes(buf))
                    if hello is not None and getattr(hello, "complete", True):
                        return hello
                if len(buf) > 2 * MAX_HELLO:
                    raise ClientHelloError(f"no ClientHello within {len(buf)} bytes")
                data = await tcp.recv()
                if not data:
                    return None
                buf.extend(data)

        try:
            hello = await asyncio.wait_for(run(), self.config.handshake_timeout)
        except TimeoutError:
            log.info("no ClientHello within %.1fs; closing", self.config.handshake_timeout)
            return None
        except ClientHelloError as e:
            log.info("closing connection: %s", e)
            return None
        except Exception as e:  # an injected parser failing must not kill the proxy
            log.info("closing connection: ClientHello parser raised %s", e.__class__.__name__)
            return None
        if hello is None:
            return None
        return hello, bytes(buf)

    async def _serve_tls(
        self, tcp: TcpStream, first: bytes, host: str, port: int, expected_sni: str | None
    ) -> None:
        got = await self._read_hello(tcp, first)
        if got is None:
            return
        hello, raw = got
        if hello.sni is None:
            log.info("closing connection to %s:%d: ClientHello has no SNI", host, port)
            return
        try:
            sni = validate_hostname(str(hello.sni))
        except ConfigError:
            log.info("closing connection: invalid SNI %r", str(hello.sni)[:80])
            return
        if expected_sni is not None and sni != canonical_host(expected_sni):
            log.warning("closing tunnel: SNI %r differs from CONNECT host %r", sni, expected_sni)
            self.stats.blocked += 1
            return
        target_ip = self.resolve.get(sni) or self.resolve.get(canonical_host(host)) or host
        if self.bypass.matches(sni):
            self.bypassed += 1
            await self._splice(tcp, raw, target_ip, port)
            return
        self.intercepted += 1
        want_h2 = self.config.http2 and "h2" in tuple(hello.alpn or ())
        await self._intercept(tcp, raw, sni, target_ip, port, want_h2)

    async def _splice(self, tcp: TcpStream, raw: bytes, ip: str, port: int) -> None:
        try:
            ur, uw = await asyncio.wait_for(
                asyncio.open_connection(ip, port), self.config.connect_timeout
            )
        except (OSError, TimeoutError) as e:
            log.info("bypass upstream %s:%d unreachable: %s", ip, port, e)
            return
        up = TcpStream(ur, uw)
        up.send(raw)
        try:
            await asyncio.gather(_pump(tcp, up), _pump(up, tcp))
        finally:
            up.close()

    async def _intercept(
        self, tcp: TcpStream, raw: bytes, sni: str, ip: str, port: int, want_h2: bool
    ) -> None:
        problem: str | None = None
        up: TcpStream | None = None
        up_alpn: str | None = None
        try:
            ctx = self.upstream_tls.context_for(sni, h2=want_h2)
            ur, uw = await asyncio.wait_for(
                asyncio.open_connection(ip, port, ssl=ctx, server_hostname=sni,
                                        ssl_handshake_timeout=self.config.handshake_timeout),
                self.config.connect_timeout + self.config.handshake_timeout,
            )
            up = TcpStream(ur, uw)
            sslobj = uw.get_extra_info("ssl_object")
            up_alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
        except ssl.SSLCertVerificationError as e:
            problem = f"upstream {sni}:{port} certificate rejected: {e.verify_message}"
        except ssl.SSLError as e:
            problem = f"TLS handshake with upstream {sni}:{port} failed: {e.reason}"
        except TimeoutError:
            problem = f"upstream {sni}:{port} did not answer in time"
        except OSError as e:
            problem = f"upstream {sni}:{port} unreachable: {e.strerror or e}"
        if problem:
            log.warning("%s", problem)
        try:
            alpn = ("h2", "http/1.1") if up_alpn == "h2" else ("http/1.1",)
            client_ctx = self.config.ca.server_context(sni, alpn)
            tls = TlsServerStream(tcp, client_ctx, raw)
            await tls.handshake(self.config.handshake_timeout)
        except (ssl.SSLError, TimeoutError, ConnectionError, OSError) as e:
            log.info("client TLS handshake for %s failed: %s", sni, e.__class__.__name__)
            if up:
                up.close()
            return
        except Exception as e:
            log.warning("cannot serve %s: %s", sni, e)
            if up:
                up.close()
            return
        if up is None:
            await self._answer_upstream_error(tls, problem or "upstream unavailable")
            return
        if up_alpn == "h2" and tls.alpn == "h2":
            await H2Session(tls, up, sni, self.policy, self.limits, self.stats).run()
        elif up_alpn == "h2":  # cannot happen with a conforming client: it offered h2
            log.info("client %s did not pick h2 although the upstream did; closing", sni)
            up.close()
            tls.close()
        else:
            await Http1Session(tls, up, sni, self.policy, self.limits, self.stats).run()

    async def _answer_upstream_error(self, tls: TlsServerStream, problem: str) -> None:
        br = BufferedReader(tls)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(br.read_until(b"\r\n\r\n", 65536), self.config.header_timeout)
        tls.send(error_response(502, "upstream_error", problem))
        with contextlib.suppress(Exception):
            await tls.drain()
        tls.close()


def _internal_error(e: Exception) -> None:
    # the type and origin only: a message could quote request bytes
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
    log.error("internal error while serving a connection: %s at %s", e.__class__.__name__, where)


async def _pump(src: Duplex, dst: Duplex) -> None:
    try:
        while True:
            data = await src.recv()
            if not data:
                dst.shutdown_write()
                return
            dst.send(data)
            await dst.drain()
    except (ConnectionError, OSError):
        dst.close()


def _split_authority(text: str) -> Address:
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or not (0 < int(port_s) < 65536):
        raise ConfigError(f"invalid CONNECT authority {text[:100]!r}: expected host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or any(c in host for c in " /\\@\x00"):
        raise ConfigError(f"invalid CONNECT host {host[:100]!r}")
    return host.lower().rstrip("."), int(port_s)
