"""``python -m minillava.train ...`` (and ``torchrun ... -m minillava.train ...``)."""

import sys

from .loop import main

sys.exit(main())
