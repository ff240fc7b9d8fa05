"""``python -m bingo``: the same as the ``bingo`` command."""

import sys

from bingo.cli import main

sys.exit(main())
