"""``python -m netstack serve ...``: see :mod:`netstack.serve`.

>>> from netstack.serve import build_parser
>>> build_parser().prog
'python -m netstack'
"""

from netstack.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
