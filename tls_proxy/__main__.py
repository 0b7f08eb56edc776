"""``tls_proxy`` / ``python -m tls_proxy``: run the proxy from the command line (click).

Every flag is checked before anything starts (no CA is created for a bad command line):
a bad flag is one line on stderr and exit status 2, as is a configuration the proxy
refuses or an address it cannot listen on.

Example::

    $ python -m tls_proxy --listen 127.0.0.1:8080 --ca-dir ~/.microvm/tls \\
          --secret OPENAI_API_KEY=sk-...@api.openai.com
    tls_proxy: listening on 127.0.0.1:8080
    tls_proxy: CA certificate /root/.microvm/tls/ca.crt
    OPENAI_API_KEY=$MSB_OPENAI_API_KEY
    tls_proxy: ready
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from tls_proxy._ca import MAX_VALIDITY_HOURS, CertificateAuthority, default_ca_dir
from tls_proxy._proxy import ProxyConfig, TlsProxy
from tls_proxy._secrets import Secret, parse_secret_spec
from tls_proxy.errors import TlsProxyError

__all__ = ["EXIT_USAGE", "cli", "main"]

EXIT_USAGE = 2
"""Exit status for a bad command line or a configuration the proxy refuses."""

_EPILOG = """\b
Example:
  tls_proxy --listen 127.0.0.1:8080 \\
      --secret OPENAI_API_KEY=sk-real@api.openai.com
  # then, in the client: HTTPS_PROXY=http://127.0.0.1:8080, trust <ca-dir>/ca.crt,
  # and send $MSB_OPENAI_API_KEY: the proxy puts the real key in TLS to
  # api.openai.com only
"""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; an empty host is 127.0.0.1) as ``(host, port)``.

    >>> parse_listen("127.0.0.1:0"), parse_listen(":8080"), parse_listen("[::1]:443")
    (('127.0.0.1', 0), ('127.0.0.1', 8080), ('::1', 443))
    >>> parse_listen("nope")
    Traceback (most recent call last):
    ...
    click.exceptions.BadParameter: invalid --listen 'nope': expected HOST:PORT
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) < 65536):
        raise click.BadParameter(f"invalid --listen {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_resolve(text: str) -> tuple[str, str]:
    """``HOST=IP`` as ``(host, ip)``, the IP checked.

    >>> parse_resolve("api.example.test=127.0.0.1")
    ('api.example.test', '127.0.0.1')
    >>> parse_resolve("a.test=999.1.1.1")
    Traceback (most recent call last):
    ...
    click.exceptions.BadParameter: invalid --resolve address '999.1.1.1' for 'a.test'
    """
    host, sep, ip = text.partition("=")
    if not sep or not host or not ip:
        raise click.BadParameter(f"invalid --resolve {text!r}: expected HOST=IP")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise click.BadParameter(f"invalid --resolve address {ip!r} for {host!r}") from None
    return host, ip


def _listen_opt(ctx: click.Context, param: click.Parameter,
                value: str | None) -> tuple[str, int] | None:
    return None if value is None else parse_listen(value)


def _resolve_opt(ctx: click.Context, param: click.Parameter,
                 values: tuple[str, ...]) -> dict[str, str]:
    return dict(parse_resolve(v) for v in values)


def _secret_opt(ctx: click.Context, param: click.Parameter,
                values: tuple[str, ...]) -> list[Secret]:
    try:
        return [parse_secret_spec(v) for v in values]
    except TlsProxyError as e:
        raise click.BadParameter(str(e)) from None


def _hours_opt(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0 < value <= MAX_VALIDITY_HOURS:
        raise click.BadParameter(f"{value!r} hours: must be in (0, {MAX_VALIDITY_HOURS}]")
    return value


@click.command(name="tls_proxy", epilog=_EPILOG,
               context_settings={"help_option_names": ["-h", "--help"],
                                 "max_content_width": 100})
@click.option("--listen", metavar="HOST:PORT", callback=_listen_opt,
              help="explicit CONNECT proxy on HOST:PORT (port 0 = any free port)")
@click.option("--transparent", metavar="HOST:PORT", callback=_listen_opt,
              help="also accept redirected TLS flows here (destination from SO_ORIGINAL_DST)")
@click.option("--ca-dir", type=click.Path(path_type=Path), default=None,
              help="directory holding ca.crt/ca.key, created if missing "
                   "(default: $MICROVM_HOME/tls or ~/.microvm/tls)")
@click.option("--secret", "secrets", multiple=True, metavar="ENV=VALUE@HOST[,HOST...]",
              callback=_secret_opt,
              help="the client sees the placeholder $MSB_ENV; VALUE replaces it only in "
                   "TLS to HOST; an empty VALUE reads $ENV (repeatable)")
@click.option("--upstream-ca", multiple=True, metavar="PEM",
              help="extra CA bundle trusted for upstream servers (repeatable)")
@click.option("--resolve", multiple=True, metavar="HOST=IP", callback=_resolve_opt,
              help="connect to IP for HOST instead of resolving it (repeatable)")
@click.option("--bypass", multiple=True, metavar="HOST",
              help="splice TLS to HOST untouched, no interception (exact or *.suffix; "
                   "repeatable)")
@click.option("--no-verify", multiple=True, metavar="HOST",
              help="skip upstream certificate verification for HOST (exact or *.suffix; "
                   "repeatable)")
@click.option("--validity-hours", type=float, default=24.0, metavar="HOURS",
              callback=_hours_opt, show_default=True,
              help="lifetime of each minted leaf certificate")
@click.option("-v", "--verbose", is_flag=True, help="log at INFO level on stderr")
def cli(listen: tuple[str, int] | None, transparent: tuple[str, int] | None,
        ca_dir: Path | None, secrets: list[Secret], upstream_ca: tuple[str, ...],
        resolve: dict[str, str], bypass: tuple[str, ...], no_verify: tuple[str, ...],
        validity_hours: float, verbose: bool) -> None:
    """Run the secret-injecting TLS proxy: an explicit CONNECT proxy (--listen) and/or a
    transparent listener (--transparent); prints the CA path and each ENV=placeholder,
    then "tls_proxy: ready", and runs until SIGINT/SIGTERM.
    """
    if not listen and not transparent:
        raise click.UsageError("give --listen and/or --transparent")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="tls_proxy: %(levelname)s %(message)s",
    )
    asyncio.run(_run(listen, transparent, ca_dir, secrets, upstream_ca, resolve, bypass,
                     no_verify, validity_hours))


async def _run(listen: tuple[str, int] | None, transparent: tuple[str, int] | None,
               ca_dir: Path | None, secrets: list[Secret], upstream_ca: Sequence[str],
               resolve: dict[str, str], bypass: Sequence[str], no_verify: Sequence[str],
               validity_hours: float) -> None:
    ca = CertificateAuthority.load_or_create(ca_dir or default_ca_dir(),
                                             validity_hours=validity_hours)
    cfg = ProxyConfig(
        ca=ca, secrets=secrets, bypass=list(bypass), upstream_ca_files=list(upstream_ca),
        resolve=resolve, no_verify=list(no_verify),
    )
    async with TlsProxy(cfg) as proxy:
        if listen:
            host, port = await proxy.listen_explicit(*listen)
            print(f"tls_proxy: listening on {host}:{port}", flush=True)
        if transparent:
            host, port = await proxy.listen_transparent(*transparent)
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


def _prog() -> str:
    return "tls_proxy" if os.path.basename(sys.argv[0]) == "tls_proxy" else "python -m tls_proxy"


def _one_line(text: str) -> str:
    return "; ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status: 0, or 2 for a bad command line or a
    configuration the proxy refuses (one line on stderr, no traceback).

    >>> main(["--ca-dir", "ca"])
    2
    >>> main(["--listen", "127.0.0.1:0", "--secret", "K=v@a.example"])  # doctest: +SKIP
    """
    prog = _prog()
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name=prog,
                 standalone_mode=False)
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print(f"tls_proxy: error: {_one_line(e.format_message())}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except click.exceptions.Abort:
        return 130
    except (TlsProxyError, ValueError) as e:
        print(f"tls_proxy: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"tls_proxy: error: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
