"""`python -m attnzoo ...`: the same command line as `attnzoo ...`."""

import sys

from attnzoo.cli import main

sys.exit(main())
