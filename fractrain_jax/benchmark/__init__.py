"""Speed benchmarks of the algorithm's steps: ``python -m fractrain_jax.benchmark {quant,step,profile}``.

``speed.py`` times one quantized conv against FP32 and one whole training step
per method (``speed.py``'s docstring says how); ``profile.py`` splits a step by
op class; ``peers.py`` is the table of ``scripts/peer_speed.sh``;
``__main__.py`` is the command.

What it may import: the algorithm (the top-level modules, ``models/``,
``data/``, ``attach/``) and, of ``run/``, only ``run.platform`` (the settings
every program applies before JAX starts); never the training loop or the
report. Nothing in the package imports the benchmark (``tests/test_layout.py``
checks both).
"""

from fractrain_jax.benchmark.speed import (NOT_BY_DEFAULT, VARIANTS, OwnModel, StepRunner,
                                           bench_quant, bench_step, main, round_ratios,
                                           step_config, time_fn, timed_methods, turn_order)

__all__ = ["NOT_BY_DEFAULT", "OwnModel", "StepRunner", "VARIANTS", "bench_quant", "bench_step",
           "main", "round_ratios", "step_config", "time_fn", "timed_methods", "turn_order"]
