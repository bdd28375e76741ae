"""`python -m swiss_knife.cli`: the same as the `swiss-knife` command (used by accelerate launch)."""

import sys

from . import main

sys.exit(main())
