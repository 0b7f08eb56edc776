"""Host names and host patterns: exact ``example.com``, ``*.example.com`` (apex included), ``*``.

Example::

    >>> from tls_proxy._hosts import HostPattern, canonical_host
    >>> HostPattern.parse("*.Example.com").matches("api.example.com")
    True
    >>> HostPattern.parse("*.example.com").matches("example.com")
    True
    >>> canonical_host("API.Example.com.:443")
    'api.example.com'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from tls_proxy.errors import ConfigError

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


def canonical_host(host: str) -> str:
    """Lower-case ``host``, strip a ``:port`` suffix, IPv6 brackets and one trailing dot.

    Example::

        >>> canonical_host("[::1]:8443")
        '::1'
    """
    h = host.strip()
    if h.startswith("["):
        end = h.find("]")
        if end > 0:
            return h[1:end].lower()
    if h.count(":") == 1:
        h = h.rsplit(":", 1)[0]
    h = h.lower()
    if h.endswith("."):
        h = h[:-1]
    return h


def validate_hostname(name: str) -> str:
    """Return the canonical form of DNS name ``name`` or raise :class:`ConfigError`.

    Example::

        >>> validate_hostname("Api.Example.COM.")
        'api.example.com'
    """
    h = name.lower()
    if h.endswith("."):
        h = h[:-1]
    if not h or len(h) > 253:
        raise ConfigError(f"invalid host name {name!r}: must be 1..253 characters")
    for label in h.split("."):
        if not _LABEL.match(label):
            raise ConfigError(
                f"invalid host name {name!r}: label {label!r} must be 1..63 of [a-z0-9_-]"
            )
    return h


@dataclass(frozen=True)
class HostPattern:
    """One allowed-host entry: ``kind`` is ``"any"``, ``"exact"`` or ``"suffix"``.

    Example::

        >>> p = HostPattern.parse("*.openai.com")
        >>> (p.kind, p.name, p.matches("api.openai.com"), p.matches("openai.com.evil"))
        ('suffix', 'openai.com', True, False)
    """

    kind: str
    name: str

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Parse ``*``, ``*.suffix`` or an exact host name (case-insensitive)."""
        if not isinstance(text, str):
            raise ConfigError(f"invalid host pattern {text!r}: expected a string")
        t = text.strip()
        if t == "*":
            return cls("any", "")
        try:
            if t.startswith("*."):
                return cls("suffix", validate_hostname(t[2:]))
            if "*" in t:
                raise ConfigError("'*' is only allowed alone or as a leading '*.'")
            return cls("exact", validate_hostname(t))
        except ConfigError as e:
            raise ConfigError(f"invalid host pattern {text!r}: {e}") from None

    def matches(self, host: str) -> bool:
        """True when canonical ``host`` is covered by this pattern."""
        h = canonical_host(host)
        if self.kind == "any":
            return True
        if self.kind == "exact":
            return h == self.name
        return h == self.name or h.endswith("." + self.name)

    def specificity(self) -> tuple[int, int]:
        """Sort key: exact beats a longer suffix beats a shorter suffix beats ``*``."""
        return ({"exact": 2, "suffix": 1, "any": 0}[self.kind], len(self.name))

    def __str__(self) -> str:
        return {"any": "*", "exact": self.name, "suffix": "*." + self.name}[self.kind]


class HostList:
    """A list of :class:`HostPattern` with ``matches`` and ``most_specific`` look-ups.

    Example::

        >>> HostList(["pinned.example", "*.bank.example"]).matches("www.bank.example")
        True
    """

    def __init__(self, patterns: Iterable[str | HostPattern] = ()) -> None:
        self.patterns: tuple[HostPattern, ...] = tuple(
            p if isinstance(p, HostPattern) else HostPattern.parse(p) for p in patterns
        )

    def matches(self, host: str) -> bool:
        """True when any pattern covers ``host``."""
        return any(p.matches(host) for p in self.patterns)

    def most_specific(self, host: str) -> HostPattern | None:
        """The matching pattern with the highest specificity, or None."""
        best = [p for p in self.patterns if p.matches(host)]
        return max(best, key=HostPattern.specificity) if best else None

    def __len__(self) -> int:
        return len(self.patterns)

    def __repr__(self) -> str:
        return f"HostList({[str(p) for p in self.patterns]!r})"
