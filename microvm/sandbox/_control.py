"""The supervisor's control protocol: one JSON object per line each way over
``control.sock``.

Requests are ``{"op": NAME, ...}``; replies ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": CLASS, "message": TEXT}``. Ops: ``status``, ``stop``
(``timeout``), ``kill``, ``net_stats``, ``rule_counters``, ``touch``.

Example::

    reply = await control_call(paths.control_sock, {"op": "status"})
    reply["state"]
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from microvm.errors import SandboxError

__all__ = ["ControlError", "control_call"]

_MAX_REPLY = 16 << 20


class ControlError(SandboxError):
    """The supervisor refused a control request, or could not be reached.

    Example::

        try:
            await control_call(path, {"op": "bogus"})
        except ControlError as e:
            print(e)
    """


async def control_call(path: Path, request: dict[str, Any], timeout: float = 30.0) -> Any:
    """Send one request to the supervisor at ``path`` and return its ``result``.

    Raises :class:`ControlError` when the supervisor cannot be reached or refuses.

    Example::

        stats = await control_call(paths.control_sock, {"op": "net_stats"})
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=_MAX_REPLY), timeout)
    except (TimeoutError, OSError) as e:
        raise ControlError(f"the sandbox supervisor is not reachable at {path}: {e}") from None
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (TimeoutError, OSError) as e:
        raise ControlError(f"the sandbox supervisor did not answer {request.get('op')!r}: "
                           f"{e or 'timeout'}") from None
    finally:
        writer.close()
    if not line:
        raise ControlError(f"the sandbox supervisor closed the connection on "
                           f"{request.get('op')!r}")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(f"{reply.get('error')}: {reply.get('message')}")
    return reply.get("result")
