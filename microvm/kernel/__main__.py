"""``python -m microvm.kernel fetch|path``: the same commands as ``microvm kernel``.

Example::

    python -m microvm.kernel fetch --dest vendor
    python -m microvm.kernel path
"""

import sys

from microvm.cli import main

if __name__ == "__main__":
    main(["kernel", *sys.argv[1:]])
