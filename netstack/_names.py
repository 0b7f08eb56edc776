"""Domain-name validation and label-aligned matching.

Names are stored lowercased, as ASCII (IDNA-encoded), without leading or trailing
dots. Labels follow RFC 2181 lengths (1-63 octets, 253 in all) and may hold letters,
digits, ``-`` and ``_``. Schemes, ports, paths, wildcards, spaces and empty labels
are refused with :class:`~netstack.PolicyError`.
"""

from __future__ import annotations

import re
from typing import Final

from netstack.errors import PolicyError

_LABEL: Final = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def normalize_domain(value: str, *, what: str = "domain") -> str:
    """Validate and canonicalise a domain name.

    >>> normalize_domain("API.Example.COM.")
    'api.example.com'

    Raises :class:`~netstack.PolicyError` naming the value and what is wrong with it.
    """
    if not isinstance(value, str):
        raise PolicyError(f"{what} must be a string, got {value!r} ({type(value).__name__})")
    text = value.strip()
    if "://" in text:
        raise PolicyError(f"{what} {value!r} contains a URL scheme; give the bare host name")
    if "/" in text:
        raise PolicyError(f"{what} {value!r} contains a path; give the bare host name")
    if ":" in text:
        raise PolicyError(
            f"{what} {value!r} contains a port; give the bare host name and use port= for ports"
        )
    if "*" in text:
        raise PolicyError(
            f"{what} {value!r} contains a wildcard; use Destination.domain_suffix for subdomains"
        )
    text = text.strip(".").lower()
    if not text:
        raise PolicyError(f"{what} {value!r} is empty")
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise PolicyError(f"{what} {value!r} is not a valid internationalised name ({exc})")
    if len(text) > 253:
        raise PolicyError(f"{what} {value!r} is longer than 253 characters")
    for label in text.split("."):
        if not label:
            raise PolicyError(f"{what} {value!r} has an empty label")
        if len(label) > 63:
            raise PolicyError(f"{what} {value!r} has a label longer than 63 characters: {label!r}")
        if not _LABEL.match(label):
            raise PolicyError(
                f"{what} {value!r} has an invalid label {label!r} "
                "(letters, digits, '-' and '_' only; no leading or trailing '-')"
            )
    return text


def try_normalize_domain(value: str) -> str | None:
    """Return the canonical form of ``value``, or ``None`` if it is not a valid name.

    >>> try_normalize_domain("Example.com.")
    'example.com'
    >>> try_normalize_domain("bad..name") is None
    True
    """
    try:
        return normalize_domain(value)
    except PolicyError:
        return None


def suffix_matches(suffix: str, name: str) -> bool:
    """Label-aligned suffix match on canonical names.

    >>> suffix_matches("example.com", "a.example.com"), suffix_matches("example.com", "badexample.com")
    (True, False)
    """
    return name == suffix or name.endswith("." + suffix)
