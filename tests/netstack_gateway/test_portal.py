"""netstack.gateway._portal is the twin of microvm._portal: one behaviour table, both run it.

netstack may not import microvm, so it carries its own copy of the project's
sync-over-async pattern; these cases keep the two alike, and the last test keeps their
code identical (misuse is a RuntimeError in both; a bad argument is netstack's
GatewayError where microvm raises ValueError).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from microvm._portal import Portal as MicrovmPortal
from netstack.errors import GatewayError
from netstack.gateway._portal import Portal as NetstackPortal

PORTALS = {"netstack": (NetstackPortal, RuntimeError),
           "microvm": (MicrovmPortal, RuntimeError)}


@pytest.fixture(params=sorted(PORTALS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_run_submit_and_errors(kind: str) -> None:
    portal_cls, _ = PORTALS[kind]

    async def boom() -> None:
        raise KeyError("x")

    with portal_cls("t") as p:
        assert p.run(asyncio.sleep(0, result=5)) == 5
        assert p.submit(asyncio.sleep(0, result=6)).result(5) == 6
        with pytest.raises(KeyError):
            p.run(boom())
    assert p.closed


def test_timeout_cancels_and_waits_for_cleanup(kind: str) -> None:
    portal_cls, _ = PORTALS[kind]
    cleaned = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.set()

    with portal_cls("t") as p:
        with pytest.raises(TimeoutError):
            p.run(slow(), timeout=0.05)
        assert cleaned.is_set()   # the cancelled coroutine's finally ran before run() raised


def test_own_thread_and_after_close_are_refused(kind: str) -> None:
    portal_cls, error = PORTALS[kind]
    p = portal_cls("t")
    refused: list[BaseException] = []

    async def reenter() -> None:
        coro = asyncio.sleep(0)
        try:
            p.run(coro)
        except BaseException as e:
            refused.append(e)

    p.run(reenter())
    assert len(refused) == 1 and isinstance(refused[0], error)
    p.close()
    p.close()
    with pytest.raises(error):
        p.run(asyncio.sleep(0))
    with pytest.raises(error):
        p.submit(asyncio.sleep(0))


def test_close_cancels_what_still_runs(kind: str) -> None:
    portal_cls, _ = PORTALS[kind]
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    p = portal_cls("t")
    p.submit(forever())
    p.run(asyncio.sleep(0))
    p.close()
    assert cancelled.is_set() and p.closed and not p.thread.is_alive()


def test_the_twins_have_the_same_code() -> None:
    """Below their module docstrings the two files differ only in the error type for a bad
    argument and the thread name's prefix: a fix in one must be made in the other."""
    import microvm._portal
    import netstack.gateway._portal

    def code(module: object, prefix: str, bad_arg: str) -> str:
        path = getattr(module, "__file__", None)
        assert path is not None
        text = Path(path).read_text(encoding="utf-8").partition('\n"""\n')[2]
        text = text.replace("from netstack.errors import GatewayError\n\n", "")
        return text.replace(prefix, "PREFIX-").replace(bad_arg, "BAD_ARG(")

    assert code(microvm._portal, "microvm-", "ValueError(") == \
        code(netstack.gateway._portal, "netstack-", "GatewayError(")


def test_bad_arguments_are_typed() -> None:
    with pytest.raises(GatewayError, match="portal name"):
        NetstackPortal("")
    with pytest.raises(ValueError, match="cancel_grace"):
        MicrovmPortal("x", cancel_grace=-1)
