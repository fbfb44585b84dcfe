"""``python -m fractrain_jax.benchmark``: the benchmarks' command line (``speed.main``)."""

import sys

from fractrain_jax.benchmark.speed import main

sys.exit(main())
