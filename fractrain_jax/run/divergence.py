"""A run that diverges stops at the first step it does, and keeps its newest sane checkpoint.

Every step's loss terms are checked (``CHECKED``: the cross-entropy, DFQ's cost
term, the steering cp, the gradients' global norm): a nan or inf in any of them,
or a cross-entropy beyond ``absurd_loss`` (100 times a uniform guess's, far
beyond any model that learns), is divergence. The run then stops with one line
(``NonFiniteError``): checkpoints whose training loss was not sane are moved
aside into ``checkpoints_bad/``, so that running again with a lower learning
rate resumes from the newest sane one.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from fractrain_jax.errors import NonFiniteError
from fractrain_jax.run import files as run_files

# The per-step metrics checked, with their names in the stop message.
CHECKED = {"ce": "training loss", "cost_term": "DFQ's cost term", "steer_cp": "steering cp",
           "grad_norm": "gradient norm"}


def absurd_loss(num_classes: int) -> float:
  """A cross-entropy far beyond any a model that learns reports: 100x that of a uniform guess."""
  return 100 * math.log(max(num_classes, 2))


def diverged(values: dict[str, Any], number: int, num_classes: int) -> str | None:
  """What diverged at step ``number`` (1-based) given its ``CHECKED`` values; None when sane."""
  for key, value in values.items():
    if not math.isfinite(float(value)):
      return f"{CHECKED[key]} became {float(value)} at step {number}"
  bound = absurd_loss(num_classes)
  if float(values["ce"]) > bound:
    return (f"training loss reached {float(values['ce']):.3g} at step {number}, beyond "
            f"{bound:.3g} (100 times a uniform guess's)")
  return None


def keep_sane(checkpoints: Any, num_classes: int) -> tuple[int | None, list[str]]:
  """Moves aside every checkpoint newer than the newest sane one; returns that one's step
  (None when none is sane) and what was moved."""
  bound = absurd_loss(num_classes)
  moved = []
  for step in checkpoints.steps():
    loss = checkpoints.read_meta(step).train_loss
    if loss is not None and math.isfinite(loss) and loss <= bound:
      return step, moved
    checkpoints.move_aside(step, "diverged")
    moved.append(f"{step} (training loss {loss:.3g})" if loss is not None else str(step))
  return None, moved


def error(config: ml_collections.ConfigDict, what: str, kept: tuple[int, float] | None,
          moved: list[str]) -> NonFiniteError:
  """The one-line stop message: what diverged, the checkpoint kept, those moved aside."""
  c = config
  where = (f"kept the checkpoint of step {kept[0]} (training loss {kept[1]:.3g})" if kept
           else "no checkpoint before it had a sane training loss")
  aside = (f"; moved aside step {', '.join(moved)} to {run_files.BAD_CHECKPOINTS}/"
           if moved else "")
  again = "resume from that checkpoint" if kept else "start over"
  return NonFiniteError(
      f"{what} ({c.method}, {c.model.name}, lr {c.optim.lr:g}); {where}{aside}. Lower "
      f"optim.lr or check the data, then run again to {again}")
