"""Shared pieces of the ``microvm`` sandbox commands: exit codes, error mapping, flag parsers.

Docker's convention: 125 when ``microvm`` itself fails, 126 when the command cannot be
run in the guest, 127 when it is missing there, else the command's own status.

Example::

    >>> parse_memory("1g"), parse_memory("512m"), parse_memory("256")
    (1024, 512, 256)
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from microvm.sandbox._sandbox import Sandbox

__all__ = [
    "EXIT_CANNOT_RUN",
    "EXIT_NOT_FOUND",
    "EXIT_OURS",
    "Failure",
    "exec_error_status",
    "for_each",
    "for_each_sandbox",
    "guarded",
    "leave",
    "one_line",
    "parse_env",
    "parse_labels",
    "parse_memory",
    "parse_patch",
    "prestart_supervisor",
    "read_new",
    "supervisor_ready",
]

EXIT_OURS = 125
"""``microvm`` itself failed (bad value, sandbox could not start, agent lost...)."""
EXIT_CANNOT_RUN = 126
"""The command exists in the guest but cannot be executed (permission, format)."""
EXIT_NOT_FOUND = 127
"""The command does not exist in the guest."""

F = TypeVar("F", bound=Callable[..., Any])


class Failure(click.ClickException):
    """A one-line failure of ours (exit 125 unless ``code`` says otherwise).

    Example::

        raise Failure("no sandbox named 'x'")
    """

    def __init__(self, message: str, code: int = EXIT_OURS) -> None:
        super().__init__(one_line(message))
        # click >= 8.2 declares exit_code a ClassVar; this instance's code shadows it
        vars(self)["exit_code"] = code


def one_line(text: object) -> str:
    """Join a message's non-empty lines with ``; `` (errors are always one line).

    Example::

        >>> one_line("a\\n  b\\n")
        'a; b'
    """
    return "; ".join(ln.strip() for ln in str(text).splitlines() if ln.strip())


#: the libraries' base errors, by module: only the modules already imported are looked
#: at (an error of a package nobody imported cannot have been raised, and importing
#: ``tls_proxy`` for the check cost every ``microvm exec`` ~0.1-0.2 s on its SystemExit)
_ERROR_BASES = (("microvm.errors", "MicrovmError"), ("rootfs.errors", "RootfsError"),
                ("netstack.errors", "NetstackError"), ("tls_proxy.errors", "TlsProxyError"))


def _library_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [OSError]
    for module, name in _ERROR_BASES:
        mod = sys.modules.get(module)
        if mod is not None:
            found.append(getattr(mod, name))
    return tuple(found)


def exec_error_status(err: BaseException) -> int:
    """The docker exit status for an exec that could not start (126, 127 or 125).

    Example::

        >>> from microvm.errors import AgentError
        >>> exec_error_status(AgentError("x", kind="not_found"))
        127
    """
    kind = getattr(err, "kind", "")
    if kind == "not_found":
        return EXIT_NOT_FOUND
    if kind in ("permission_denied", "not_executable", "bad_cwd"):
        return EXIT_CANNOT_RUN
    return EXIT_OURS


def guarded(fn: F) -> F:
    """Turn the libraries' typed errors into one line on stderr and exit 125.

    Example::

        @click.command()
        @guarded
        def ls() -> None: ...
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as e:
            if not isinstance(e, _library_errors()):
                raise
            raise Failure(f"{type(e).__name__}: {e}") from None

    return wrapper  # type: ignore[return-value]


_MEM_RE = re.compile(r"(\d+)([kmgt]?)i?b?", re.IGNORECASE)


def parse_memory(value: str) -> int:
    """Guest RAM in MiB from ``512m``, ``1g``, ``2048`` (MiB) or ``1536MiB``.

    Raises ``click.BadParameter`` naming the value.

    Example::

        >>> parse_memory("2G")
        2048
    """
    m = _MEM_RE.fullmatch(value.strip())
    if not m:
        raise click.BadParameter(f"{value!r} is not a size: give MiB (512), or 512m, 1g",
                                 param_hint="-m/--memory")
    n, unit = int(m.group(1)), m.group(2).lower()
    mib = {"": n, "k": n // 1024, "m": n, "g": n * 1024, "t": n * 1024 * 1024}[unit]
    if not 64 <= mib <= 65536:
        raise click.BadParameter(f"{value!r} is out of range: 64 MiB to 64 GiB",
                                 param_hint="-m/--memory")
    return mib


def parse_env(items: Iterable[str], env_files: Iterable[str] = ()) -> dict[str, str]:
    """``-e K=V`` / ``-e K`` (taken from our environment) and ``--env-file`` lines.

    Example::

        >>> parse_env(["A=1", "B=x=y"])
        {'A': '1', 'B': 'x=y'}
    """
    out: dict[str, str] = {}
    lines: list[tuple[str, str]] = []
    for f in env_files:
        try:
            text = Path(f).read_text()
        except OSError as e:
            raise click.BadParameter(f"cannot read {f!r}: {e.strerror}",
                                     param_hint="--env-file") from None
        lines += [("--env-file", ln.strip()) for ln in text.splitlines()
                  if ln.strip() and not ln.lstrip().startswith("#")]
    lines += [("-e/--env", i) for i in items]
    for hint, item in lines:
        k, sep, v = item.partition("=")
        if not k or "\0" in item or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", k):
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint=hint)
        if not sep:
            if k not in os.environ:
                continue  # docker: `-e NAME` passes NAME only when it is set here
            v = os.environ[k]
        out[k] = v
    return out


def parse_labels(items: Iterable[str], hint: str = "--label") -> dict[str, str]:
    """``--label K=V`` pairs.

    Example::

        >>> parse_labels(["team=a"])
        {'team': 'a'}
    """
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=hint)
        out[k] = v
    return out


def parse_patch(spec: str) -> Any:
    """One ``--patch KIND:ARGS`` into a ``rootfs.Patch``.

    Kinds: ``text:/path=CONTENT``, ``append:/path=CONTENT``, ``copy:HOST=/guest``,
    ``symlink:TARGET=/link``, ``mkdir:/path``, ``remove:/path``.

    Example::

        >>> parse_patch("text:/etc/motd=hi").to_dict()["kind"]
        'text'
    """
    from rootfs import Patch, PatchError

    kind, sep, args = spec.partition(":")
    a, eq, b = args.partition("=")
    usage = ("use text:/PATH=CONTENT, append:/PATH=CONTENT, copy:HOST=/GUEST, "
             "symlink:TARGET=/LINK, mkdir:/PATH or remove:/PATH")
    try:
        if kind == "text" and eq:
            return Patch.text(a, b)
        if kind == "append" and eq:
            return Patch.append(a, b)
        if kind == "copy" and eq:
            return Patch.copy_dir(a, b) if Path(a).is_dir() else Patch.copy_file(a, b)
        if kind == "symlink" and eq:
            return Patch.symlink(a, b)
        if kind == "mkdir" and sep and not eq:
            return Patch.mkdir(args)
        if kind == "remove" and sep and not eq:
            return Patch.remove(args)
    except (PatchError, ValueError, OSError) as e:
        raise click.BadParameter(f"{spec!r}: {one_line(e)}", param_hint="--patch") from None
    raise click.BadParameter(f"{spec!r}: {usage}", param_hint="--patch")


def read_new(path: Path, pos: int, limit: int = -1) -> tuple[bytes, int]:
    """What a growing file (a log) holds past offset ``pos``, up to ``limit`` bytes (all
    when negative), and the offset after it: ``(b"", pos)`` when it has nothing new or
    does not exist. ``logs -f`` and ``attach`` tail the console log with it.

    Example::

        chunk, pos = read_new(sb.paths.console_log, pos)
    """
    if not path.exists() or path.stat().st_size <= pos:
        return b"", pos
    with path.open("rb") as f:
        f.seek(pos)
        chunk = f.read(limit)
    return chunk, pos + len(chunk)


def prestart_supervisor() -> None:
    """First thing in a command that starts sandboxes: connect to this user's shared
    supervisor zygote (a Python with the supervisor's imports loaded, which outlives the
    command: :mod:`microvm.sandbox._zygote`), starting it when none runs, so that it loads
    beside our own imports and checks; :func:`supervisor_ready` waits for it.

    Example::

        prestart_supervisor(); kw = sandbox_kwargs(...); supervisor_ready(); Sandbox.create(...)
    """
    from microvm.sandbox import _zygote as zygote

    zygote.prestart(shared=True)   # back-to-back commands fork from the same warm one


def supervisor_ready(timeout: float = 30.0) -> None:
    """Wait (up to ``timeout`` s) for the zygote :func:`prestart_supervisor` started, so
    the start forks it instead of spawning a second interpreter beside it (a one-shot
    command would otherwise pay both). Returns at once when it is off or dead.

    Example::

        supervisor_ready()
    """
    from microvm.sandbox import _zygote as zygote

    zygote.wait_ready(timeout)


#: True when :func:`microvm.cli.main` is this process's command line (the console script,
#: ``python -m microvm``): :func:`leave` may then skip the interpreter's teardown
PROGRAM = False


def leave(code: int) -> NoReturn:
    """Exit with ``code`` once stdout and stderr are flushed. As the process's own command
    line (:data:`PROGRAM`) the atexit handlers run and the interpreter's teardown (module
    cleanup, a last GC: ~40 ms, a sixth of a ``microvm exec``) is skipped; called from
    another program it is ``sys.exit``.

    Example::

        leave(0)
    """
    def flush() -> None:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (BrokenPipeError, ValueError):
                pass

    flush()
    if not PROGRAM:
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    flush()
    os._exit(code)


def for_each(names: Iterable[str], verb: str, fn: Callable[[str], None]) -> None:
    """Apply ``fn`` to every name and echo it; one line per failure, exit 125 if any failed.

    Example::

        for_each(("a", "b"), "rm", Sandbox.remove)
    """
    failed = 0
    for n in names:
        try:
            fn(n)
            click.echo(n)
        except _library_errors() as e:
            failed += 1
            click.echo(f"microvm: {verb} {n!r}: {type(e).__name__}: {e}", err=True)
    if failed:
        sys.exit(EXIT_OURS)


def for_each_sandbox(names: Iterable[str], verb: str,
                     action: Callable[[Sandbox], None]) -> None:
    """:func:`for_each` over ``Sandbox.get(name)`` handles (each closed after ``action``).

    Example::

        for_each_sandbox(("web",), "kill", lambda sb: sb.kill())
    """
    from microvm import Sandbox

    def one(name: str) -> None:
        sb = Sandbox.get(name)
        try:
            action(sb)
        finally:
            sb.close()

    for_each(names, verb, one)
