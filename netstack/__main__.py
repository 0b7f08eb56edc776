"""``python -m netstack serve ...``: see :mod:`netstack.serve`.

>>> from netstack.serve import cli
>>> sorted(cli.commands)
['serve']
"""

from netstack.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
