"""`python -m poptune.cli`: the same as the `poptune` command."""

import sys

from poptune.cli import main

sys.exit(main())
