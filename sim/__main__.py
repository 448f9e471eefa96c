"""`python -m sim` runs the IB gateway simulator (same as `qe-ib-sim`)."""

import sys

from .server import main

sys.exit(main())
