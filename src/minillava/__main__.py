"""``python -m minillava``: the same command line as the ``minillava`` console script."""

import sys

from .cli import main

sys.exit(main())
