"""Exceptions raised by :mod:`microvm`; all derive from :class:`MicrovmError`."""

from __future__ import annotations


class MicrovmError(Exception):
    """Base class of every error raised by microvm."""
