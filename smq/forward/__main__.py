"""`python -m smq.forward`: the same as `smq forward`."""

import sys

from .main import main

sys.exit(main())
