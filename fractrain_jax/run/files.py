"""What a training run leaves in its workdir: the file names.

Shared by the writer (train.py) and the readers (``report/``, tests), and free
of JAX, so a report runs wherever the files can be copied to. The keys of a
metrics line are listed in docs/DESIGN.md.
"""

from __future__ import annotations

CONFIG = "config.json"          # The run's config, as JSON.
METRICS = "metrics.jsonl"       # One JSON object per evaluation (docs/DESIGN.md).
SUMMARY = "summary.json"        # Written once the last iteration is done.
CHECKPOINTS = "checkpoints"     # Orbax checkpoints: arrays, plus the run's bookkeeping.
BAD_CHECKPOINTS = "checkpoints_bad"  # Checkpoints moved aside (unreadable, diverged), kept.
TENSORBOARD = "tensorboard"     # The numeric metrics as TensorBoard scalars.
LOG = "log.txt"                 # A copy of the run's console lines.
