"""`python -m smq`: the same program as the `smq` command (and the PEX entry point)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
