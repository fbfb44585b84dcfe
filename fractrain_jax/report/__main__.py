"""``python -m fractrain_jax.report``: the report's command line (``cli.main``)."""

import sys

from fractrain_jax.report.cli import main

sys.exit(main())
