"""Every blocking twin has its async original's names and signatures (no guest needed).

The project's one sync-over-async pattern (:mod:`microvm._portal`): a blocking class
whose methods are the async class's, signatures written out, bodies one
``portal.run``. This test keeps each pair in step: the same public names (less a
short, named list of sync-only or async-only ones), the same parameters (name, kind,
default, annotation) and the same return annotation once the ``Async``/``Sync``
prefixes are taken out; no sync method is a coroutine function.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from microvm import AsyncSandbox, Machine, Sandbox
from microvm._portal import Portal, run_once
from microvm.agent import AgentClient, ExecProcess, SyncAgentClient, SyncExecProcess
from microvm.sandbox import (
    AsyncExecHandle,
    AsyncSandboxFs,
    AsyncSandboxNetwork,
    ExecHandle,
    SandboxFs,
    SandboxNetwork,
)
from microvm.sandbox._exec import AsyncExecStdin
from microvm.sandbox._sandbox import ExecStdin

_DUNDER_TWINS = {"__enter__": "__aenter__", "__exit__": "__aexit__"}


@dataclass(frozen=True)
class Twin:
    """One sync/async pair and its documented differences."""

    sync_cls: type
    async_cls: type
    #: plain (non-async) methods on the async side that the twin mirrors as plain methods
    plain: frozenset[str] = frozenset()
    #: names only the blocking class has (say why in its docstring)
    sync_only: frozenset[str] = frozenset()
    #: names only the async class has
    async_only: frozenset[str] = frozenset()
    #: annotation rewrites (regex -> replacement) applied to both sides before comparing
    rewrites: tuple[tuple[str, str], ...] = field(default=())


_SANDBOX_NORM = ((r"\bAsyncIterator\b", "Iterator"),
                 (r"\bAsync(Sandbox\w*|ExecHandle|ExecStdin)\b", r"\1"))
_AGENT_NORM = ((r"\bSync(AgentClient|ExecProcess)\b", r"\1"),
               (r"\s*\|\s*AsyncIterator\[bytes\]", ""),   # write_file_chunks takes sync chunks
               (r"\bAsyncIterator\b", "Iterator"))

TWINS = [
    *(Twin(s, a, plain=frozenset({"default_command", "info", "logs", "evaluate", "explain"}),
           rewrites=_SANDBOX_NORM)
      for s, a in [(Sandbox, AsyncSandbox), (SandboxFs, AsyncSandboxFs),
                   (ExecHandle, AsyncExecHandle), (ExecStdin, AsyncExecStdin),
                   (SandboxNetwork, AsyncSandboxNetwork)]),
    Twin(SyncAgentClient, AgentClient,
         plain=frozenset({"allocate_id", "release_id", "pause_reading", "resume_reading",
                          "exec_stream", "closed"}),
         sync_only=frozenset({"run"}),
         rewrites=(*_AGENT_NORM, (r"\bSelf\b", "AgentClient"))),
    Twin(SyncExecProcess, ExecProcess,
         # pid/result are plain attributes of ExecProcess, properties of the twin; events()
         # is the blocking form of ``async for``
         sync_only=frozenset({"pid", "result", "events"}),
         rewrites=_AGENT_NORM),
]


def _public(cls: type) -> dict[str, type]:
    """Public names (and the context-manager dunders) defined by ``cls`` or its bases."""
    out: dict[str, type] = {}
    for klass in reversed(cls.__mro__[:-1]):   # without object
        for n in vars(klass):
            if not n.startswith("_") or n in _DUNDER_TWINS or n in _DUNDER_TWINS.values():
                out[n] = klass
    return out


def _norm(annotation: Any, rewrites: tuple[tuple[str, str], ...]) -> str:
    """An annotation (a string under ``from __future__ import annotations``) without the
    sync/async differences."""
    text = annotation if isinstance(annotation, str) else repr(annotation)
    text = text.replace("builtins.", "")
    for pattern, repl in rewrites:
        text = re.sub(pattern, repl, text)
    return text


def _function(cls: type, name: str) -> tuple[Any, Callable[..., Any]]:
    attr = inspect.getattr_static(cls, name)
    if isinstance(attr, property):
        assert attr.fget is not None
        return attr, attr.fget
    if isinstance(attr, functools.cached_property):
        return attr, attr.func
    raw = attr.__func__ if isinstance(attr, classmethod | staticmethod) else attr
    return attr, raw


@pytest.mark.parametrize("twin", TWINS, ids=[t.sync_cls.__name__ for t in TWINS])
def test_sync_twin_has_the_async_signatures(twin: Twin) -> None:
    sync_names = {n for n in _public(twin.sync_cls) if not n.startswith("__")}
    async_names = {n for n in _public(twin.async_cls) if not n.startswith("__")}
    assert sync_names - twin.sync_only == async_names - twin.async_only, \
        (sync_names - twin.sync_only) ^ (async_names - twin.async_only)
    assert twin.sync_only <= sync_names and twin.async_only <= async_names
    pairs = [(n, n) for n in sorted(sync_names & async_names)]
    pairs += [(s, a) for s, a in _DUNDER_TWINS.items()
              if s in _public(twin.sync_cls) or a in _public(twin.async_cls)]
    where = twin.sync_cls.__name__
    for s_name, a_name in pairs:
        s_attr, s_fn = _function(twin.sync_cls, s_name)
        a_attr, a_fn = _function(twin.async_cls, a_name)
        assert type(s_attr) is type(a_attr), (where, s_name, type(s_attr), type(a_attr))
        assert not inspect.iscoroutinefunction(s_fn) and not inspect.isasyncgenfunction(s_fn), \
            f"{where}.{s_name} must block, not be async"
        if not isinstance(a_attr, property | functools.cached_property) and not (
                inspect.iscoroutinefunction(a_fn) or inspect.isasyncgenfunction(a_fn)):
            # the few plain helpers (no I/O) stay plain in both
            assert s_name in twin.plain or s_name.startswith("__"), \
                f"{twin.async_cls.__name__}.{a_name} is neither async nor a known plain helper"
        ss, sa = inspect.signature(s_fn), inspect.signature(a_fn)
        s_params = [(p.name, p.kind, p.default, _norm(p.annotation, twin.rewrites))
                    for p in ss.parameters.values()]
        a_params = [(p.name, p.kind, p.default, _norm(p.annotation, twin.rewrites))
                    for p in sa.parameters.values()]
        assert s_params == a_params, f"{where}.{s_name}: {ss} != {sa}"
        assert _norm(ss.return_annotation, twin.rewrites) == \
            _norm(sa.return_annotation, twin.rewrites), \
            f"{where}.{s_name} returns {ss.return_annotation}, async {sa.return_annotation}"
        assert "**" not in str(ss), f"{where}.{s_name} hides its parameters: {ss}"


def test_machine_twins() -> None:
    """``Machine``'s blocking and asyncio methods take the same parameters."""
    for s_name, a_name in [("shutdown", "ashutdown"), ("agent", "aagent")]:
        _, s_fn = _function(Machine, s_name)
        _, a_fn = _function(Machine, a_name)
        ss, sa = inspect.signature(s_fn), inspect.signature(a_fn)
        assert list(ss.parameters) == list(sa.parameters), (s_name, ss, sa)
    # start() is astart() without the asyncio-only ``more_bootstrap``
    assert list(inspect.signature(Machine.astart).parameters) == ["self", "more_bootstrap"]
    assert list(inspect.signature(Machine.start).parameters) == ["self"]


def test_twins_are_exported() -> None:
    import microvm
    import microvm.agent as agent
    import microvm.sandbox as pkg

    for t in TWINS[:5]:
        if t.sync_cls is ExecStdin:
            continue
        assert getattr(pkg, t.sync_cls.__name__) is t.sync_cls
        assert getattr(pkg, t.async_cls.__name__) is t.async_cls
    assert microvm.Sandbox is Sandbox and microvm.AsyncSandbox is AsyncSandbox
    for t in TWINS[5:]:
        for cls in (t.sync_cls, t.async_cls):
            assert getattr(agent, cls.__name__) is cls


# -- the portal itself ------------------------------------------------------------------------------
def test_portal_runs_coroutines_and_raises_their_errors() -> None:
    async def boom() -> None:
        raise KeyError("x")

    with Portal("test") as portal:
        assert portal.run(asyncio.sleep(0, result=5)) == 5
        assert portal.run_in_loop(threading.current_thread) is portal.thread
        with pytest.raises(KeyError):
            portal.run(boom())
    assert portal.closed and not portal.thread.is_alive()
    with pytest.raises(RuntimeError, match="after close"):
        portal.run(asyncio.sleep(0))
    assert run_once(asyncio.sleep(0, result="once")) == "once"


def test_portal_refuses_its_own_thread() -> None:
    with Portal("test") as portal:
        async def inner() -> None:
            portal.run(asyncio.sleep(0))

        with pytest.raises(RuntimeError, match="own loop thread"):
            portal.run(inner())


def test_an_interrupted_run_cancels_the_coroutine_and_waits_for_its_cleanup() -> None:
    """Ctrl-C in the waiting thread: the coroutine is cancelled and its ``finally`` runs
    before ``run`` re-raises (a half-booted VMM is killed, not left behind)."""
    assert threading.current_thread() is threading.main_thread()
    started, cleaned = threading.Event(), threading.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)   # cleanup may await
            cleaned.set()

    def interrupt() -> None:
        if started.wait(60):
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    helper = threading.Thread(target=interrupt, daemon=True)
    helper.start()
    with Portal("test") as portal, pytest.raises(KeyboardInterrupt):
        portal.run(slow(), timeout=120)   # a lost signal fails with TimeoutError, not a hang
    helper.join(60)
    assert cleaned.is_set()


def test_a_run_timeout_cancels_the_coroutine_and_an_inner_timeout_is_its_own() -> None:
    cleaned = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()

    async def inner_timeout() -> None:
        await asyncio.wait_for(asyncio.sleep(3600), 0.01)

    with Portal("test") as portal:
        with pytest.raises(TimeoutError):
            portal.run(slow(), timeout=0.05)
        assert cleaned.is_set()
        with pytest.raises(TimeoutError):   # the coroutine's own, not the portal's
            portal.run(inner_timeout())
        assert portal.run(asyncio.sleep(0.3, result="sliced"), timeout=60) == "sliced"
