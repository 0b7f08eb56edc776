"""The one parent-path walker of rootfs: guest paths resolved inside a root, never on the host.

Both layer unpacking (:mod:`rootfs._unpack`) and patching (:mod:`rootfs._patches`) place
an entry at ``parent/name`` where ``parent`` may run through symlinks that the image
(or an earlier layer or patch) created. The host kernel must never follow those links:
this walker resolves them lexically, component by component, inside the root, with a
single rule for both callers:

* a relative symlink target continues from the link's directory;
* an absolute symlink target restarts at the root (as it would in the guest, and as
  containerd resolves image paths), so ``/var/run -> /run`` works and no target ever
  names a host path;
* a ``..`` that would climb above the root is **refused** (the guest kernel would
  clamp it at ``/``; a tree that relies on that is broken or hostile, so the safer
  rule is to refuse rather than to guess);
* more than :data:`MAX_HOPS` symlinks is refused (loops).

What a missing or non-directory component means is the caller's business (``settle``):
unpack creates directories, patches continue below a missing one.

Example::

    >>> tree = {"a": ("dir", ""), "a/l": ("link", "/b"), "b": ("dir", "")}
    >>> def probe(comps):
    ...     return tree.get("/".join(comps), ("missing", ""))
    >>> def fail(reason):
    ...     return ValueError(reason)
    >>> walk_parents(["a", "l", "c"], probe, lambda comps, kind, info: None, fail)
    ['b', 'c']
    >>> walk_parents(["a", "..", ".."], probe, lambda comps, kind, info: None, fail)
    Traceback (most recent call last):
    ...
    ValueError: a '..' climbs above the root
    >>> tree["a/up"] = ("link", "../../etc")
    >>> walk_parents(["a", "up", "x"], probe, lambda comps, kind, info: None, fail)
    Traceback (most recent call last):
    ...
    ValueError: a '..' climbs above the root (through the symlink '/a/up' -> '../../etc')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

MAX_HOPS = 40

Probe = Callable[[list[str]], tuple[str, str]]
"""``probe(components) -> (kind, info)``: ``("dir", "")``, ``("link", target)``,
``("missing", "")`` or ``("other", description)`` for the node at ``components``."""

Settle = Callable[[list[str], str, str], None]
"""``settle(components, kind, info)`` for a ``missing``/``other`` component: make it a
directory (then return), or raise the caller's typed error; returning continues the
walk below it."""


def walk_parents(comps: Sequence[str], probe: Probe, settle: Settle,
                 fail: Callable[[str], Exception]) -> list[str]:
    """Canonical (symlink-free) components of the directory ``comps`` inside the root.

    ``fail(reason)`` builds the caller's typed exception for an escaping ``..`` or a
    symlink loop.

    Example::

        >>> walk_parents(["x", ".", "y"], lambda c: ("dir", ""), lambda *a: None, ValueError)
        ['x', 'y']
    """
    resolved: list[str] = []
    queue = list(comps)
    via = ""  # the last symlink followed, for messages
    hops = 0
    while queue:
        c = queue.pop(0)
        if c in ("", "."):
            continue
        if c == "..":
            if not resolved:
                raise fail("a '..' climbs above the root" + (f" (through the symlink {via})"
                                                               if via else ""))
            resolved.pop()
            continue
        kind, info = probe([*resolved, c])
        if kind == "link":
            hops += 1
            if hops > MAX_HOPS:
                raise fail(f"more than {MAX_HOPS} symlinks in the parent path (a loop?)")
            via = f"{'/' + '/'.join([*resolved, c])!r} -> {info[:200]!r}"
            if info.startswith("/"):
                resolved = []
            queue = info.split("/") + queue
            continue
        if kind != "dir":
            settle([*resolved, c], kind, info)
        resolved.append(c)
    return resolved
