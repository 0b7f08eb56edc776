"""``SandboxPaths``: where one sandbox keeps its files and sockets.

``$MICROVM_HOME/sandboxes/<name>/`` holds ``launch.json``, ``supervisor.log``, the
prepared root (``root/upper.ext4``) and, when the path is short enough for unix sockets
(108 bytes), the runtime directory ``run/`` (VMM rundir: ``console.log``, the agent port,
the frame socket) with the supervisor's ``agent.sock`` and ``control.sock``; otherwise the
runtime directory is ``$TMPDIR/mvsb-<hash of the sandbox dir>``, named the same way by
every process.

Example::

    >>> p = SandboxPaths(Path("/root/.microvm/sandboxes/web"))
    >>> p.agent_sock.name, p.console_log.name
    ('agent.sock', 'console.log')
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from rootfs import microvm_home

__all__ = ["SandboxPaths", "sandboxes_root", "volumes_root"]

_SOCKET_BUDGET = 90  # room for the longest socket name below the 108-byte limit


def sandboxes_root() -> Path:
    """``$MICROVM_HOME/sandboxes``.

    Example::

        >>> sandboxes_root().name
        'sandboxes'
    """
    return microvm_home() / "sandboxes"


def volumes_root() -> Path:
    """``$MICROVM_HOME/volumes`` (named volumes; they outlive sandboxes).

    Example::

        >>> volumes_root().name
        'volumes'
    """
    return microvm_home() / "volumes"


class SandboxPaths:
    """The files of one sandbox (see the module docstring)."""

    def __init__(self, sandbox_dir: Path) -> None:
        self.dir = sandbox_dir.absolute()
        run = self.dir / "run"
        if len(str(run / "control.sock")) > _SOCKET_BUDGET:
            digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:16]
            run = Path(tempfile.gettempdir()) / f"mvsb-{digest}"
        self.run = run

    @classmethod
    def of(cls, name: str) -> SandboxPaths:
        """The paths of sandbox ``name`` under ``$MICROVM_HOME``.

        Example::

            >>> SandboxPaths.of("web").dir.name
            'web'
        """
        return cls(sandboxes_root() / name)

    @property
    def agent_sock(self) -> Path:
        """The relayed guest agent protocol."""
        return self.run / "agent.sock"

    @property
    def control_sock(self) -> Path:
        """The supervisor's control socket (JSON lines)."""
        return self.run / "control.sock"

    @property
    def console_log(self) -> Path:
        """The guest console (hvc0)."""
        return self.run / "console.log"

    @property
    def supervisor_log(self) -> Path:
        """The supervisor's own log."""
        return self.dir / "supervisor.log"

    @property
    def root(self) -> Path:
        """Where the prepared root (upper disk) lives."""
        return self.dir / "root"

    @staticmethod
    def volume(name: str) -> Path:
        """The directory of named volume ``name``.

        Example::

            >>> SandboxPaths.volume("cache").name
            'cache'
        """
        return volumes_root() / name
