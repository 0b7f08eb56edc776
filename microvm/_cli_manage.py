"""``microvm ls | ps | stop | kill | rm | logs | inspect | stats | cp | net``: managing sandboxes.

Each command is a thin layer over :class:`microvm.Sandbox` (list, get, stop, kill,
remove, logs, metrics, fs, network).

Example::

    microvm ls -a --filter label=team=a --format json
    microvm cp ./app.py web:/srv/app.py
    microvm net explain web --to 169.254.169.254:80
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from microvm._cli_util import Failure, for_each, for_each_sandbox, guarded, parse_labels, read_new

if TYPE_CHECKING:
    from microvm.sandbox._asandbox import SandboxInfo
    from microvm.sandbox._sandbox import Sandbox

__all__ = ["register"]


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0, int(time.time() - t))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit} ago"
    return f"{s}s ago"


def _row(i: SandboxInfo) -> dict[str, Any]:
    return {"name": i.name, "state": i.state, "image": i.config.image, "labels": i.labels,
            "pid": i.pid, "created": i.created, "started": i.started, "stopped": i.stopped,
            "ports": [p.to_str() for p in i.config.ports], "error": i.error or None}


@click.command("ls")
@click.option("-a", "--all", "all_", is_flag=True, help="also stopped and crashed sandboxes")
@click.option("--filter", "filters", multiple=True, metavar="label=K=V | state=S | name=N",
              help="keep sandboxes matching every filter")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="json: one JSON array")
@click.option("-q", "--quiet", is_flag=True, help="names only")
@guarded
def ls_cmd(all_: bool, filters: tuple[str, ...], fmt: str, quiet: bool) -> None:
    """List sandboxes (running ones unless -a).

    \b
    Example:
      microvm ls -a --filter label=team=a --format json
    """
    from microvm import Sandbox

    labels: list[str] = []
    states: set[str] = set()
    names: set[str] = set()
    for f in filters:
        key, eq, val = f.partition("=")
        if key == "label" and eq:
            labels.append(val)
        elif key == "state" and val in ("created", "running", "stopped", "crashed"):
            states.add(val)
        elif key == "name" and val:
            names.add(val)
        else:
            raise click.BadParameter(f"{f!r}: use label=K=V, state=created|running|stopped|"
                                     f"crashed or name=N", param_hint="--filter")
    rows = [_row(i) for i in Sandbox.list(labels=parse_labels(labels, "--filter") or None)]
    rows = [r for r in rows if (all_ or states or r["state"] in ("running", "created"))
            and (not states or r["state"] in states) and (not names or r["name"] in names)]
    if quiet:
        for r in rows:
            click.echo(r["name"])
    elif fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        table = [("NAME", "STATE", "IMAGE", "CREATED", "PORTS")]
        table += [(r["name"], r["state"], str(r["image"]), _ago(r["created"]),
                   ",".join(r["ports"])) for r in rows]
        widths = [max(len(t[c]) for t in table) for c in range(5)]
        for t in table:
            click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip())


@click.command("stop")
@click.option("-t", "--time", "timeout", type=click.FloatRange(0, 3600), default=10.0,
              show_default=True, help="seconds to wait before killing")
@click.argument("names", nargs=-1, required=True)
def stop_cmd(names: tuple[str, ...], timeout: float) -> None:
    """Shut sandboxes down (sync, power off); killed after -t seconds.

    \b
    Example:
      microvm stop -t 5 web
    """
    for_each_sandbox(names, "stop", lambda sb: sb.stop(timeout))


@click.command("kill")
@click.argument("names", nargs=-1, required=True)
def kill_cmd(names: tuple[str, ...]) -> None:
    """Stop sandboxes at once.

    \b
    Example:
      microvm kill web
    """
    for_each_sandbox(names, "kill", lambda sb: sb.kill())


@click.command("rm")
@click.option("-f", "--force", is_flag=True, help="stop running sandboxes first")
@click.argument("names", nargs=-1, required=True)
def rm_cmd(names: tuple[str, ...], force: bool) -> None:
    """Remove sandboxes (their disk and record; named volumes stay).

    \b
    Example:
      microvm rm -f web
    """
    from microvm import Sandbox
    from microvm.errors import SandboxError

    def rm(n: str) -> None:
        info = Sandbox.get(n)
        state = info.state
        info.close()
        if state in ("running", "created") and not force:
            raise SandboxError(f"sandbox is {state}: stop it first or use rm -f")
        Sandbox.remove(n)

    for_each(names, "rm", rm)


@click.command("logs")
@click.option("-f", "--follow", is_flag=True, help="keep printing while it runs")
@click.option("--tail", type=click.IntRange(min=0), default=None, help="last N lines only")
@click.option("--supervisor", is_flag=True, help="the supervisor's log, not the console")
@click.argument("name")
@guarded
def logs_cmd(name: str, follow: bool, tail: int | None, supervisor: bool) -> None:
    """Print the guest console of NAME (kernel, and output of `run -d` commands).

    \b
    Example:
      microvm logs --tail 20 -f web
    """
    from microvm import Sandbox

    sb = Sandbox.get(name)
    source = "supervisor" if supervisor else "console"
    text = sb.logs(tail=tail, source=source)
    sys.stdout.write(text)
    sys.stdout.flush()
    if follow:
        path = sb.paths.supervisor_log if supervisor else sb.paths.console_log
        pos = path.stat().st_size if path.exists() else 0
        try:
            while True:
                chunk, pos = read_new(path, pos)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                elif sb.state not in ("running", "created"):
                    break
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    sb.close()


def _status(sb: Sandbox) -> dict[str, Any]:
    from microvm.sandbox._control import ControlError, control_call

    try:
        result: dict[str, Any] = asyncio.run(control_call(sb.paths.control_sock,
                                                          {"op": "status"}, 5.0))
    except (ControlError, OSError):
        return {}
    return result


@click.command("inspect")
@click.argument("name")
@guarded
def inspect_cmd(name: str) -> None:
    """NAME as JSON: config, state, network policy, guest address, published ports.

    \b
    Example:
      microvm inspect web | python3 -m json.tool
    """
    from microvm import Sandbox

    sb = Sandbox.get(name)
    info = sb.info()
    status = _status(sb) if info.state == "running" else {}
    doc = {
        "name": name, "state": info.state, "pid": info.pid, "error": info.error or None,
        "created": info.created, "started": info.started, "stopped": info.stopped,
        "labels": info.labels, "config": json.loads(sb.config.to_json()),
        "network": {"policy": sb.network.policy.to_dict(),
                    "guest_ipv4": status.get("guest"),
                    "published": status.get("published", {})},
        "default_command": sb.default_command(), "dir": str(sb.paths.dir),
    }
    sb.close()
    click.echo(json.dumps(doc, indent=2, default=str))


@click.command("stats")
@click.argument("name")
@guarded
def stats_cmd(name: str) -> None:
    """The guest's figures as JSON (uptime, load, CPU, memory, disk, network).

    \b
    Example:
      microvm stats web
    """
    from microvm import Sandbox

    sb = Sandbox.get(name)
    try:
        click.echo(json.dumps(sb.metrics(), indent=2, default=str))
    finally:
        sb.close()


def _split(spec: str) -> tuple[str | None, str]:
    """``NAME:/path`` -> (NAME, /path); a host path -> (None, path)."""
    name, sep, path = spec.partition(":")
    if sep and path.startswith("/") and "/" not in name and name:
        return name, path
    return None, spec


@click.command("cp")
@click.argument("src")
@click.argument("dst")
@guarded
def cp_cmd(src: str, dst: str) -> None:
    """Copy a file or directory between the host and a sandbox (NAME:/path on one side).

    \b
    Example:
      microvm cp ./app.py web:/srv/app.py
      microvm cp web:/var/log ./logs
    """
    from microvm import Sandbox

    (sname, spath), (dname, dpath) = _split(src), _split(dst)
    if (sname is None) == (dname is None):
        raise click.UsageError(f"exactly one of {src!r} and {dst!r} must be NAME:/path")
    sb = Sandbox.get(sname or dname or "")
    try:
        if dname is not None:
            host = Path(spath)
            if not host.exists():
                raise Failure(f"{spath!r} does not exist")
            if dpath.endswith("/") or (sb.fs.exists(dpath) and sb.fs.stat(dpath).type == "dir"):
                dpath = dpath.rstrip("/") + "/" + host.name
            _to_guest(sb, host, dpath)
        else:
            host = Path(dpath)
            if host.is_dir():
                host = host / os.path.basename(spath.rstrip("/"))
            _to_host(sb, spath, host)
    finally:
        sb.close()


def _to_guest(sb: Sandbox, host: Path, guest: str) -> None:
    if host.is_dir():
        sb.fs.mkdir(guest, parents=True)
        for child in sorted(host.iterdir()):
            _to_guest(sb, child, f"{guest}/{child.name}")
    else:
        sb.fs.copy_from_host(host, guest, mkdirs=True)


def _to_host(sb: Sandbox, guest: str, host: Path) -> None:
    st = sb.fs.stat(guest)
    if st.type == "dir":
        host.mkdir(parents=True, exist_ok=True)
        for e in sb.fs.list(guest):
            if e.name not in (".", ".."):
                _to_host(sb, f"{guest.rstrip('/')}/{e.name}", host / e.name)
    elif st.type == "file":
        sb.fs.copy_to_host(guest, host)


@click.group("net")
def net_group() -> None:
    """A sandbox's network: why a flow is allowed, per-rule counters.

    \b
    Example:
      microvm net explain web --to api.example.com:443
    """


@net_group.command("explain")
@click.argument("name")
@click.option("--to", "to", required=True, metavar="HOST:PORT[/proto]",
              help="destination (an IP or a name); proto tcp (default), udp, icmpv4")
@click.option("--ingress", is_flag=True, help="a connection into the guest's PORT")
@guarded
def net_explain(name: str, to: str, ingress: bool) -> None:
    """Why NAME's policy allows or denies a flow (first matching rule).

    \b
    Example:
      microvm net explain web --to 169.254.169.254:80
    """
    from microvm import Sandbox
    from netstack import Flow

    spec, _, proto = to.partition("/")
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"{to!r} is not HOST:PORT[/tcp|udp]", param_hint="--to")
    sb = Sandbox.get(name)
    try:
        flow = Flow("ingress" if ingress else "egress", proto or "tcp", host.strip("[]"),
                    int(port))
        click.echo(sb.network.explain(flow))
    finally:
        sb.close()


@net_group.command("counters")
@click.argument("name")
@guarded
def net_counters(name: str) -> None:
    """Per-rule hits/packets/bytes and the gateway's counters of NAME, as JSON.

    \b
    Example:
      microvm net counters web
    """
    from microvm import Sandbox

    sb = Sandbox.get(name)
    try:
        click.echo(json.dumps({"rules": sb.network.rule_counters(),
                               "gateway": sb.network.stats()}, indent=2, default=str))
    finally:
        sb.close()


def register(group: click.Group) -> None:
    """Add these commands to the ``microvm`` group (``ps`` is ``ls``).

    Example::

        register(cli)
    """
    for c in (ls_cmd, stop_cmd, kill_cmd, rm_cmd, logs_cmd, inspect_cmd, stats_cmd, cp_cmd,
              net_group):
        group.add_command(c)
    group.add_command(ls_cmd, "ps")
