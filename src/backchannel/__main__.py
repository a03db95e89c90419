"""``python -m backchannel``: the command line."""

import sys

from backchannel.cli import main

sys.exit(main())
