"""``python -m microvm ...`` runs the ``microvm`` command (see :mod:`microvm.cli`).

Example::

    python3 -m microvm kernel fetch --dest vendor
"""

from microvm.cli import main

if __name__ == "__main__":
    main()
