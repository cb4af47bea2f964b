"""``python -m poptune``: the ``poptune`` command."""

import sys

from poptune.cli import main

sys.exit(main())
