"""``python -m tls_proxy``: run the explicit (CONNECT) proxy from the command line.

Example::

    $ python -m tls_proxy --listen 127.0.0.1:8080 --ca-dir ~/.microvm/tls \\
          --secret OPENAI_API_KEY=sk-...@api.openai.com
    tls_proxy: listening on 127.0.0.1:8080
    tls_proxy: CA certificate /root/.microvm/tls/ca.crt
    OPENAI_API_KEY=$MSB_OPENAI_API_KEY
    tls_proxy: ready
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from tls_proxy.ca import CertificateAuthority, default_ca_dir
from tls_proxy.errors import TlsProxyError
from tls_proxy.proxy import ProxyConfig, TlsProxy
from tls_proxy.secrets import parse_secret_spec


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) < 65536):
        raise argparse.ArgumentTypeError(f"invalid --listen {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _resolve(text: str) -> tuple[str, str]:
    host, sep, ip = text.partition("=")
    if not sep or not host or not ip:
        raise argparse.ArgumentTypeError(f"invalid --resolve {text!r}: expected HOST=IP")
    return host, ip


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (see the module docstring).

    Example::

        >>> build_parser().parse_args(["--listen", "127.0.0.1:0"]).listen
        ('127.0.0.1', 0)
    """
    prog = "tls_proxy" if os.path.basename(sys.argv[0]) == "tls_proxy" else "python -m tls_proxy"
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"example:\n  {prog} --listen 127.0.0.1:8080 \\\n"
               "      --secret OPENAI_API_KEY=sk-real@api.openai.com\n"
               "  # then, in the client: HTTPS_PROXY=http://127.0.0.1:8080, trust "
               "<ca-dir>/ca.crt,\n"
               "  # and send $MSB_OPENAI_API_KEY: the proxy puts the real key in TLS to "
               "api.openai.com only")
    p.add_argument("--listen", type=_listen, metavar="HOST:PORT",
                   help="explicit CONNECT proxy on HOST:PORT (port 0 = any free port)")
    p.add_argument("--transparent", type=_listen, metavar="HOST:PORT",
                   help="also accept redirected TLS flows here (destination from SO_ORIGINAL_DST)")
    p.add_argument("--ca-dir", default=None,
                   help="directory holding ca.crt/ca.key, created if missing "
                        "(default: $MICROVM_HOME/tls or ~/.microvm/tls)")
    p.add_argument("--secret", action="append", default=[], metavar="ENV=VALUE@HOST[,HOST...]",
                   help="the client sees the placeholder $MSB_ENV; VALUE replaces it only in "
                        "TLS to HOST (repeatable)")
    p.add_argument("--upstream-ca", action="append", default=[], metavar="PEM",
                   help="extra CA bundle trusted for upstream servers (repeatable)")
    p.add_argument("--resolve", action="append", default=[], type=_resolve, metavar="HOST=IP",
                   help="connect to IP for HOST instead of resolving it (repeatable)")
    p.add_argument("--bypass", action="append", default=[], metavar="HOST",
                   help="splice TLS to HOST untouched, no interception (exact or *.suffix; "
                        "repeatable)")
    p.add_argument("--no-verify", action="append", default=[], metavar="HOST",
                   help="skip upstream certificate verification for HOST (exact or *.suffix)")
    p.add_argument("--validity-hours", type=float, default=24.0, metavar="HOURS",
                   help="lifetime of each minted leaf certificate (default 24)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level on stderr")
    return p


async def _run(args: argparse.Namespace) -> None:
    ca = CertificateAuthority.load_or_create(args.ca_dir or default_ca_dir(),
                                             validity_hours=args.validity_hours)
    secrets = [parse_secret_spec(s) for s in args.secret]
    cfg = ProxyConfig(
        ca=ca, secrets=secrets, bypass=args.bypass, upstream_ca_files=args.upstream_ca,
        resolve=dict(args.resolve), no_verify=args.no_verify,
    )
    async with TlsProxy(cfg) as proxy:
        if args.listen:
            host, port = await proxy.listen_explicit(*args.listen)
            print(f"tls_proxy: listening on {host}:{port}", flush=True)
        if args.transparent:
            host, port = await proxy.listen_transparent(*args.transparent)
            print(f"tls_proxy: transparent on {host}:{port}", flush=True)
        print(f"tls_proxy: CA certificate {ca.cert_path}", flush=True)
        for s in secrets:
            print(f"{s.env}={s.placeholder}", flush=True)
        print("tls_proxy: ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad arguments or configuration).

    Example::

        >>> main(["--listen", "127.0.0.1:0", "--secret", "K=v@a.example"])  # doctest: +SKIP
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.listen and not args.transparent:
        parser.error("give --listen and/or --transparent")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="tls_proxy: %(levelname)s %(message)s",
    )
    try:
        asyncio.run(_run(args))
    except (TlsProxyError, ValueError) as e:
        print(f"tls_proxy: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tls_proxy: error: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
