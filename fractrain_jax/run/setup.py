"""``RunSetup``: what a training run runs with, fixed for the whole run.

Built by ``train._setup`` and read by the loop and by ``summary``; a module of
its own so that ``summary`` needs nothing of the loop that calls it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import ml_collections

from fractrain_jax import cost, methods, steps
from fractrain_jax.run.checkpoints import Checkpoints
from fractrain_jax.run.workdir import MetricsFile


@dataclasses.dataclass
class RunSetup:
  """What the loop runs with, fixed for the whole run."""
  config: ml_collections.ConfigDict
  method: methods.Method
  workdir: pathlib.Path
  source: Any                         # The loaded data (data.load): arrays, windows or a stream.
  trainer: steps.Trainer
  plain_layers: list[cost.LayerMACs]  # The plain model: FP32 and SBM references.
  checkpoints: Checkpoints
  metrics: MetricsFile

  @property
  def total_iters(self) -> int:
    return self.config.train.iters + self.config.train.finetune_iters
