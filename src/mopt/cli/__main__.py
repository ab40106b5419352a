"""``python -m mopt.cli``."""

import sys

from mopt.cli import main

sys.exit(main())
