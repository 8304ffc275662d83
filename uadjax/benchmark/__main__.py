"""`python -m uadjax.benchmark`."""

import sys

from uadjax.benchmark.cli import main

sys.exit(main())
