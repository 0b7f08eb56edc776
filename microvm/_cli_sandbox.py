"""``microvm run | create | start | exec | shell | attach``: docker habits on ``microvm.Sandbox``.

``run`` is :meth:`Sandbox.create` (or :meth:`Sandbox.restore` with ``--from-snapshot``)
+ a streamed exec of CMD (or of the image's entrypoint + cmd); ``run -d`` starts it as
the sandbox's main process instead (:mod:`microvm._cli_attach`), which ``attach`` joins;
``exec``/``shell`` (and ``attach`` without a main process) are streamed execs on
:meth:`Sandbox.get`. Flags go before IMAGE (after it they belong to the command, as in
docker). Exit status: the command's; 125 ours; 126/127 cannot run / not found in the
guest.

Example::

    microvm run --rm -e GREETING=hi busybox:1.36 sh -c 'echo $GREETING'
    microvm run -d --name web -p 8080:80 busybox:1.36 httpd -f -p 80
    microvm exec -it web sh
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from microvm._cli_stream import DETACHED, Interrupted, parse_detach_keys, stream
from microvm._cli_util import (
    EXIT_OURS,
    Failure,
    exec_error_status,
    guarded,
    leave,
    one_line,
    parse_env,
    parse_labels,
    parse_memory,
    parse_patch,
    prestart_supervisor,
    supervisor_ready,
)

if TYPE_CHECKING:
    from microvm.sandbox._sandbox import Sandbox

__all__ = ["create_options", "register", "sandbox_kwargs"]

_RUN_EPILOG = """\b
Examples:
  microvm run --rm busybox:1.36 echo hi
  microvm run -it --name dev -v $PWD:/src -w /src busybox:1.36 sh
  microvm run -d --name web -p 8080:80 --net-rule allow@dns --net-rule allow@public:tcp:443 IMG
"""


def _opt(*decls: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(*decls, **kw)


_CREATE_OPTIONS = [
    _opt("--name", default=None, help="sandbox name (default: IMAGE's name + random suffix)"),
    _opt("-c", "--cpus", type=click.IntRange(1, 32), default=1, show_default=True,
         help="virtual CPUs"),
    _opt("-m", "--memory", default="512m", show_default=True,
         help="guest RAM: MiB as a number, or 512m, 1g"),
    _opt("-e", "--env", "env", multiple=True, metavar="K=V",
         help="environment variable (K alone: take it from here)"),
    _opt("--env-file", multiple=True, metavar="FILE", help="K=V lines ('#' comments)"),
    _opt("-v", "--volume", "volumes", multiple=True, metavar="HOST:GUEST[:ro]",
         help="bind a host directory, or NAME:GUEST for a named volume"),
    _opt("-p", "--publish", "ports", multiple=True, metavar="[IP:]HOST:GUEST[/udp]",
         help="publish a guest port on 127.0.0.1"),
    _opt("-w", "--workdir", default=None, help="working directory of commands"),
    _opt("-u", "--user", default=None, help="user of commands (name or uid)"),
    _opt("--hostname", default=None, help="guest hostname"),
    _opt("--label", "labels", multiple=True, metavar="K=V", help="label (for ls --filter)"),
    _opt("--entrypoint", default=None, help="override the image's entrypoint"),
    _opt("--net", default=None, metavar="PRESET",
         help="network preset: public_only (default), none, allow_all, non_local, ..."),
    _opt("--net-rule", "net_rules", multiple=True, metavar="RULE",
         help="<action>[:<direction>]@<target>[:<proto>[:<ports>]], e.g. allow@dns, "
              "allow@api.example.com:tcp:443, deny@10.0.0.0/8 (first match wins)"),
    _opt("--net-default-egress", type=click.Choice(["allow", "deny"]), default=None,
         help="what --net-rule does not match (default deny)"),
    _opt("--deny-domain", "deny_domains", multiple=True, metavar="DOMAIN",
         help="refuse this domain (DNS and TLS SNI)"),
    _opt("--secret", "secrets_", multiple=True, metavar="ENV=VALUE@HOST[,HOST]",
         help="the guest sees a placeholder in ENV; the value is injected only in TLS to HOST"),
    _opt("--patch", "patches", multiple=True, metavar="KIND:ARGS",
         help="change the root before boot: text:/P=C, append:/P=C, copy:HOST=/G, "
              "symlink:T=/L, mkdir:/P, remove:/P"),
    _opt("--pull", type=click.Choice(["always", "missing", "never"]), default="missing",
         show_default=True, help="when to pull IMAGE from its registry"),
    _opt("--registry-insecure", is_flag=True, help="plain HTTP / unverified registry"),
    _opt("--registry-ca", default=None, metavar="FILE", help="CA bundle for the registry"),
    _opt("--max-duration", default=None, metavar="D", help="stop after D (90, 30s, 5m, 2h)"),
    _opt("--idle-timeout", default=None, metavar="D", help="stop after D without activity"),
    _opt("--replace", is_flag=True, help="remove an existing sandbox of the same name first"),
]


def create_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command with every ``create`` flag (shared by ``run`` and ``create``).

    Example::

        @click.command()
        @create_options
        def create(**kw): ...
    """
    for opt in reversed(_CREATE_OPTIONS):
        fn = opt(fn)
    return fn


def _volumes(specs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")) \
                or not parts[0] or not parts[1]:
            raise click.BadParameter(f"{spec!r} is not HOST:GUEST[:ro|rw] or NAME:GUEST",
                                     param_hint="-v/--volume")
        ro = len(parts) == 3 and parts[2] == "ro"
        src = parts[0]
        if "/" in src or src.startswith("."):
            out[parts[1]] = {"host": str(Path(src).expanduser().absolute()), "readonly": ro}
        else:
            out[parts[1]] = {"named": src, "readonly": ro}
    return out


def _ports(specs: tuple[str, ...]) -> list[str]:
    import ipaddress

    out = []
    for spec in specs:
        body, slash, proto = spec.partition("/")
        parts = body.split(":")
        if len(parts) == 3:
            ip = parts[0].strip("[]")
            try:
                loopback = ip == "localhost" or ipaddress.ip_address(ip).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise click.BadParameter(
                    f"{spec!r}: ports are published on 127.0.0.1 only (got {parts[0]!r})",
                    param_hint="-p/--publish")
            parts = parts[1:]
        if len(parts) == 1:
            parts = [parts[0], parts[0]]
        out.append(":".join(parts) + (slash + proto))
    return out


def _secrets(specs: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    for spec in specs:
        env, eq, rest = spec.partition("=")
        value, at, hosts = rest.rpartition("@")
        if not eq or not env or not at or not hosts:
            raise click.BadParameter(f"{spec!r} is not ENV=VALUE@HOST[,HOST]",
                                     param_hint="--secret")
        out.append({"env": env, "value": value, "hosts": hosts.split(",")})
    return out


def _network(net: str | None, rules: tuple[str, ...], default_egress: str | None,
             deny_domains: tuple[str, ...]) -> object:
    if net is not None and (rules or default_egress):
        raise click.UsageError("give --net PRESET or --net-rule/--net-default-egress, not both")
    parsed = []
    for r in rules:
        from netstack import PolicyError, Rule

        try:
            parsed.append(Rule.parse(r))
        except PolicyError as e:
            raise click.BadParameter(one_line(e), param_hint="--net-rule") from None
    if rules or default_egress:
        policy: dict[str, Any] = {"default_egress": default_egress or "deny", "rules": parsed}
    elif net is not None:
        if net == "none" and not deny_domains:
            return "none"
        policy = {"preset": net}
    elif deny_domains:
        policy = {"preset": "public_only"}
    else:
        return None
    if deny_domains:
        policy["deny_domains"] = list(deny_domains)
    return policy


def sandbox_kwargs(image: str, opts: dict[str, Any], *, detached: bool) -> dict[str, Any]:
    """``Sandbox.create`` keyword arguments from the ``create`` flags (cheap checks only).

    Example::

        kw = sandbox_kwargs("busybox:1.36", {"cpus": 1, "memory": "1g", ...}, detached=True)
    """
    name = opts["name"] or _default_name(image)
    kw: dict[str, Any] = {
        "image": _image_arg(image),
        "cpus": opts["cpus"], "memory": parse_memory(opts["memory"]),
        "env": parse_env(opts["env"], opts["env_file"]) or None,
        "volumes": _volumes(opts["volumes"]) or None,
        "ports": _ports(opts["ports"]) or None,
        "workdir": opts["workdir"], "user": opts["user"], "hostname": opts["hostname"],
        "labels": parse_labels(opts["labels"]) or None,
        "network": _network(opts["net"], opts["net_rules"], opts["net_default_egress"],
                            opts["deny_domains"]),
        "secrets": _secrets(opts["secrets_"]) or None,
        "patches": [parse_patch(p) for p in opts["patches"]],
        "pull_policy": {"missing": "if-missing"}.get(opts["pull"], opts["pull"]),
        "registry_insecure": opts["registry_insecure"],
        "registry_ca_certs": opts["registry_ca"],
        "max_duration": opts["max_duration"], "idle_timeout": opts["idle_timeout"],
        "replace": opts["replace"], "detached": detached,
    }
    if opts["entrypoint"] is not None:
        kw["entrypoint"] = [opts["entrypoint"]] if opts["entrypoint"] else []
    return {"name": name, **kw}


def _image_arg(image: str) -> str | os.PathLike[str]:
    """A directory (``./root``, ``/abs``) is served as the root; anything else is a ref."""
    if image.startswith(("/", "./", "../")) and Path(image).is_dir():
        return Path(image).absolute()
    return image


def _default_name(image: str) -> str:
    import secrets

    base = image.rstrip("/").rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    base = "".join(c if c.isalnum() or c in "_.-" else "-" for c in base).strip("-.") or "sb"
    return f"{base[:40]}-{secrets.token_hex(3)}"


def _run_in(sb: Sandbox, argv: list[str], *, interactive: bool, tty: bool,
            env: dict[str, str] | None = None, cwd: str | None = None, user: str | None = None,
            timeout: float | None = None, detach_keys: bytes | None = None,
            image_hint: bool = False) -> int:
    """Stream ``argv``; 126/127 (one line) when it cannot start."""
    from microvm.errors import AgentError

    try:
        return stream(sb, argv, stdin=interactive, tty=tty, env=env, cwd=cwd, user=user,
                      timeout=timeout, detach_keys=detach_keys)
    except AgentError as e:
        code = exec_error_status(e)
        if code == EXIT_OURS:
            raise
        hint = ""
        if image_hint and argv[0].startswith("-"):
            hint = f": flags go before IMAGE ({argv[0]!r} was taken as the command)"
        what = "not found" if code == 127 else "cannot be run"
        click.echo(f"microvm: {argv[0]!r} {what} in the guest{hint} ({one_line(e)})", err=True)
        return code


@click.command("run", context_settings={"allow_interspersed_args": False}, epilog=_RUN_EPILOG)
@create_options
@click.option("--from-snapshot", "from_snapshot", default=None, metavar="SNAPSHOT",
              help="start from a snapshot (microvm snapshot ls) instead of IMAGE: every "
                   "argument is then CMD; only --name, --label, --secret, --replace apply")
@click.option("-d", "--detach", is_flag=True,
              help="run CMD (default: the image's entrypoint+cmd) in the background and leave "
                   "the sandbox running; print its name")
@click.option("--rm", "remove", is_flag=True, help="remove the sandbox when CMD exits")
@click.option("-i", "--interactive", is_flag=True, help="forward stdin (and its EOF)")
@click.option("-t", "--tty", is_flag=True, help="a terminal in the guest (raw mode here)")
@click.option("--detach-keys", default="ctrl-]", show_default=True,
              help="with -it: keys that leave the session (sandbox keeps running)")
@click.argument("image", required=False)
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
@guarded
def run_cmd(image: str | None, cmd: tuple[str, ...], from_snapshot: str | None, detach: bool,
            remove: bool, interactive: bool, tty: bool, detach_keys: str, **opts: Any) -> None:
    """Create a sandbox from IMAGE and run CMD in it (default: the image's entrypoint+cmd).

    Flags after IMAGE belong to CMD (as in docker). Without -d the sandbox stops when CMD
    exits (and is removed with --rm); Ctrl-C is sent to CMD, a second one stops it.
    With --from-snapshot SNAPSHOT the sandbox is a restore of that snapshot (no IMAGE:
    every argument is CMD).
    """
    keys = parse_detach_keys(detach_keys)
    if detach and remove:
        raise click.UsageError("-d and --rm do not go together (a detached sandbox outlives CMD)")
    kw: dict[str, Any] = {}
    if from_snapshot is not None:
        _restore_refusals(opts)
    elif image is None:
        raise click.UsageError("missing IMAGE (or give --from-snapshot SNAPSHOT)")
    else:
        kw = sandbox_kwargs(image, opts, detached=detach or tty)   # cheap checks first
    prestart_supervisor()       # the supervisor's imports load beside ours
    from microvm import Sandbox

    if from_snapshot is not None:
        cmd = (image, *cmd) if image is not None else cmd
        image = from_snapshot
        sb = _restore(from_snapshot, opts, detached=detach or tty)
        name = sb.name
    else:
        name = kw.pop("name")
        supervisor_ready()
        sb = Sandbox.create(name, **kw)
    if detach:
        # docker's `run -d IMAGE`: the image's entrypoint+cmd in the background (a restored
        # sandbox already runs what its snapshot ran: only an explicit CMD is started)
        argv = list(cmd) if cmd or from_snapshot is not None else sb.default_command()
        if argv:
            from microvm._cli_attach import launch_main

            launch_main(sb, argv, stdin=interactive)
        click.echo(name)
        sb.close()
        return
    code = EXIT_OURS
    detached = False
    try:
        argv = list(cmd) or sb.default_command()
        if not argv:
            raise Failure(f"image {image!r} has no entrypoint or cmd: give CMD")
        code = _run_in(sb, argv, interactive=interactive, tty=tty, detach_keys=keys,
                       image_hint=True)
        if code == DETACHED:
            detached = True
            click.echo(f"\r\nmicrovm: detached from {name!r} (still running; "
                       f"`microvm attach {name}` gets back in)", err=True)
            code = 0
    except (Interrupted, KeyboardInterrupt) as e:
        code = 128 + (e.signum if isinstance(e, Interrupted) else 2)
    finally:
        if not detached:
            _finish(sb, remove)
    leave(code)


#: the ``create`` flags a restore takes (the rest is fixed by the snapshot)
_RESTORE_FLAGS = ("name", "labels", "secrets_", "replace")


def _restore_refusals(opts: dict[str, Any]) -> None:
    """A ``create`` flag the snapshot fixes (``-m``, ``-v``, ``-e``...) given with
    ``--from-snapshot`` is a usage error naming it."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    for param in ctx.command.params:
        if param.name in opts and param.name not in _RESTORE_FLAGS and \
                ctx.get_parameter_source(param.name) not in (ParameterSource.DEFAULT, None):
            raise click.UsageError(
                f"{'/'.join(param.opts)} does not go with --from-snapshot (the snapshot fixes "
                f"the sandbox; it takes --name, --label, --secret and --replace)")


def _restore(snapshot: str, opts: dict[str, Any], *, detached: bool) -> Sandbox:
    """``run --from-snapshot``: a new sandbox restored from ``snapshot`` (flags checked by
    :func:`_restore_refusals`); a missing snapshot or a taken name exits 125.
    """
    from microvm import Sandbox
    from microvm.errors import SandboxNotFound
    from microvm.sandbox._snapshots import resolve

    path = resolve(snapshot)            # a bad or missing snapshot fails here
    name = opts["name"] or _default_name(path.name)
    labels = parse_labels(opts["labels"]) or None
    secret_list = _secrets(opts["secrets_"]) or None
    if opts["replace"]:
        try:
            Sandbox.remove(name)
        except SandboxNotFound:
            pass
    supervisor_ready()
    return Sandbox.restore(snapshot, name=name, secrets=secret_list, detached=detached,
                           labels=labels)


def _finish(sb: Sandbox, remove: bool) -> None:
    """Stop (and with ``--rm`` remove) the sandbox of an attached run, ignoring signals."""
    import signal

    from microvm import Sandbox

    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if remove:
            sb.close()
            Sandbox.remove(sb.name)
        else:
            sb.stop()
            sb.close()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@click.command("create", context_settings={"allow_interspersed_args": False})
@create_options
@click.argument("image")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
@guarded
def create_cmd(image: str, cmd: tuple[str, ...], **opts: Any) -> None:
    """Create and boot a sandbox from IMAGE without running a command; prints its name.

    CMD, when given, becomes the sandbox's default command.

    \b
    Example:
      microvm create --name dev -v $PWD:/src busybox:1.36 && microvm exec dev ls /src
    """
    kw = sandbox_kwargs(image, opts, detached=True)      # cheap checks first
    if cmd:
        kw["cmd"] = list(cmd)
    name = kw.pop("name")
    prestart_supervisor()       # the supervisor's imports load beside ours
    from microvm import Sandbox

    supervisor_ready()
    Sandbox.create(name, **kw).close()
    click.echo(name)


@click.command("start")
@click.option("--secret", "secrets_", multiple=True, metavar="ENV=VALUE@HOST[,HOST]",
              help="secret values again (they are never stored)")
@click.argument("names", nargs=-1, required=True)
@guarded
def start_cmd(names: tuple[str, ...], secrets_: tuple[str, ...]) -> None:
    """Start stopped sandboxes again (their disk and config kept).

    \b
    Example:
      microvm start web
    """
    secret_list = _secrets(secrets_) or None
    prestart_supervisor()       # the supervisor's imports load beside ours
    from microvm import Sandbox

    supervisor_ready()
    for n in names:
        Sandbox.start(n, detached=True, secrets=secret_list).close()
        click.echo(n)


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="forward stdin (and its EOF)")
@click.option("-t", "--tty", is_flag=True, help="a terminal in the guest")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", help="environment variable")
@click.option("-w", "--workdir", default=None, help="working directory")
@click.option("-u", "--user", default=None, help="user (name or uid)")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="kill the command after this many seconds")
@click.option("--detach-keys", default="ctrl-]", show_default=True,
              help="with -it: keys that end the session")
@click.argument("name")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@guarded
def exec_cmd(name: str, cmd: tuple[str, ...], interactive: bool, tty: bool,
             env: tuple[str, ...], workdir: str | None, user: str | None,
             timeout: float | None, detach_keys: str) -> None:
    """Run CMD in the running sandbox NAME; exits with its status.

    \b
    Example:
      microvm exec web cat /etc/os-release
      echo hi | microvm exec -i web sh -c 'cat > /tmp/x'
    """
    from microvm import Sandbox

    keys = parse_detach_keys(detach_keys)
    envd = parse_env(env)
    sb = Sandbox.get(name)
    try:
        code = _run_in(sb, list(cmd), interactive=interactive, tty=tty, env=envd or None,
                       cwd=workdir, user=user, timeout=timeout, detach_keys=keys)
    except Interrupted as e:
        code = 128 + e.signum
    sb.close()
    leave(0 if code == DETACHED else code)


def _interactive(name: str, keys: bytes, *, main: bool = False) -> NoReturn:
    """A TTY session in NAME's shell; with ``main``, first try its main process (attach)."""
    from microvm import Sandbox

    sb = Sandbox.get(name)
    tty = os.isatty(0)
    code: int | None = None
    try:
        if main:
            from microvm._cli_attach import attach_main

            code = attach_main(sb, keys)
        if code is None:
            code = _run_in(sb, [sb.config.shell], interactive=True, tty=tty, detach_keys=keys)
    except Interrupted as e:
        code = 128 + e.signum
    sb.close()
    if code == DETACHED:
        click.echo(f"\r\nmicrovm: detached from {name!r}", err=True)
        code = 0
    leave(code)


@click.command("shell")
@click.argument("name")
@guarded
def shell_cmd(name: str) -> None:
    """An interactive shell (the sandbox's shell) in NAME.

    \b
    Example:
      microvm shell web
    """
    _interactive(name, parse_detach_keys("ctrl-]"))


@click.command("attach")
@click.option("--detach-keys", default="ctrl-]", show_default=True,
              help="keys that leave (the sandbox keeps running), e.g. ctrl-p,ctrl-q")
@click.argument("name")
@guarded
def attach_cmd(name: str, detach_keys: str) -> None:
    """Attach this terminal to NAME's main process (what `run -d` started): its output as it
    comes, this terminal's lines to its stdin when it was started with -i (`run -di`), and
    its exit status when it ends; Ctrl-C or the detach keys leave it running. A sandbox
    without a main process (`create`, `run -it`) gets a TTY session in its shell instead
    (raw mode, keystrokes and resizes forwarded; the detach keys leave it).

    \b
    Example:
      microvm run -di --name job busybox:1.36 sh -c 'read x; echo got $x'
      microvm attach job --detach-keys ctrl-p,ctrl-q
    """
    _interactive(name, parse_detach_keys(detach_keys), main=True)


def register(group: click.Group) -> None:
    """Add these commands to the ``microvm`` group.

    Example::

        register(cli)
    """
    for c in (run_cmd, create_cmd, start_cmd, exec_cmd, shell_cmd, attach_cmd):
        group.add_command(c)

