"""Exceptions raised by :mod:`netstack`; all derive from :class:`NetstackError`."""

from __future__ import annotations


class NetstackError(Exception):
    """Base class of every error raised by netstack."""


class PolicyError(NetstackError, ValueError):
    """A network policy, rule, destination or flow was malformed.

    The message names the offending value and what is allowed, e.g.
    ``PolicyError("port range '90-80' is inverted (start 90 > end 80)")``.
    """
