"""Exceptions raised by :mod:`rootfs`; all derive from :class:`RootfsError`."""

from __future__ import annotations


class RootfsError(Exception):
    """Base class of every error raised by rootfs."""
