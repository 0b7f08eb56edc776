"""``python -m rootfs``: see :mod:`rootfs.cli`."""

from rootfs.cli import run

run()
