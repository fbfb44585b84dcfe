"""Learning-rate schedules and the paper's SGD (SPEC section 6), built from optax.

The optimizer is PyTorch's ``torch.optim.SGD`` with momentum and coupled
weight decay on every parameter, which the paper's recipe uses:

    d = g + weight_decay * p;  buf = momentum * buf + d;  p -= lr * buf

as ``add_decayed_weights`` followed by ``sgd`` (optax's ``trace`` is exactly
PyTorch's momentum buffer without dampening). It is wrapped in
``optax.inject_hyperparams`` so the learning rate of the latest update sits in
the optimizer state, where ``current_lr`` reads it for logging.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

LR_SCHEDULES = ("piecewise", "cosine", "linear")
# 'sgd': the paper's CNN recipe. 'adamw': for the Transformer LM, which SGD
# trains poorly (it diverged at lr 0.3 on WikiText-2 here).
OPTIMIZERS = ("sgd", "adamw")


def _main_schedule(optim_config: ml_collections.ConfigDict, steps: int,
                   offset: int) -> optax.Schedule:
  """The schedule after the warm-up: ``steps`` long, starting at iteration ``offset``."""
  name = optim_config.schedule
  lr = float(optim_config.lr)
  if name == "piecewise":
    boundaries = tuple(optim_config.boundaries)
    if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
      raise ValueError(
          f"optim.boundaries={boundaries!r}; expected strictly increasing iterations")
    # Boundaries count iterations from the start of training; join_schedules
    # restarts the count at the end of the warm-up. A boundary inside the
    # warm-up lands at 0: the decay is already in force when the warm-up ends.
    scales: dict[int, float] = {}
    for b in boundaries:
      at = max(int(b) - offset, 0)
      scales[at] = scales.get(at, 1.0) * float(optim_config.decay)
    return optax.piecewise_constant_schedule(lr, scales)
  if name == "cosine":
    return optax.cosine_decay_schedule(lr, decay_steps=steps)
  if name == "linear":
    return optax.linear_schedule(lr, 0.0, transition_steps=steps)
  raise ValueError(f"optim.schedule={name!r}; expected one of {LR_SCHEDULES}")


def make_lr_schedule(optim_config: ml_collections.ConfigDict,
                     total_iters: int) -> optax.Schedule:
  """The lr of update ``i`` (0-based) over a run of ``total_iters`` updates.

  'piecewise': ``lr * decay**k`` with k the number of boundaries ``<= i``;
  'cosine' / 'linear': from ``lr`` down to 0 at ``i = total_iters``. With
  ``warmup_iters > 0``, updates ``0 .. warmup_iters - 1`` use ``warmup_lr``
  and the cosine/linear decay spans the remaining updates.
  """
  if not (isinstance(total_iters, numbers.Integral) and total_iters > 0):
    raise ValueError(f"total_iters={total_iters!r}; expected an int > 0")
  warmup = int(optim_config.warmup_iters)
  if not 0 <= warmup < total_iters:
    raise ValueError(
        f"optim.warmup_iters={warmup!r}; expected 0 <= warmup_iters < "
        f"total_iters={total_iters}")
  main = _main_schedule(optim_config, total_iters - warmup, warmup)
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.constant_schedule(float(optim_config.warmup_lr)), main], [warmup])


def _sgd_coupled_decay(learning_rate: float, momentum: float,
                       weight_decay: float) -> optax.GradientTransformation:
  # Decay is added to the gradient before the momentum buffer (PyTorch SGD),
  # unlike decoupled (AdamW-style) decay.
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum),
  )


def make_optimizer(optim_config: ml_collections.ConfigDict,
                   total_iters: int) -> optax.GradientTransformation:
  """PyTorch-SGD (or AdamW) with the configured schedule; the lr is readable via ``current_lr``.

  AdamW (``optim.name='adamw'``): ``momentum`` is its beta1 (beta2 0.999),
  ``weight_decay`` is decoupled, applied as ``lr * weight_decay * p``.
  """
  schedule = make_lr_schedule(optim_config, total_iters)
  if optim_config.get("name", "sgd") == "adamw":
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, b1=float(optim_config.momentum),
        weight_decay=float(optim_config.weight_decay))
  return optax.inject_hyperparams(_sgd_coupled_decay)(
      learning_rate=schedule,
      momentum=float(optim_config.momentum),
      weight_decay=float(optim_config.weight_decay))


def current_lr(opt_state: Any) -> jax.Array:
  """The lr of the latest update (of update 0 right after init).

  Accepts the optax state of ``make_optimizer`` or an ``nnx.Optimizer``'s
  ``opt_state`` (whose leaves are wrapped in ``nnx.Variable``s).
  """
  try:
    lr = opt_state.hyperparams["learning_rate"]
  except (AttributeError, KeyError, TypeError):
    raise ValueError(
        "opt_state has no hyperparams['learning_rate']; expected the state of "
        "make_optimizer(...)") from None
  if isinstance(lr, nnx.Variable):
    lr = lr.get_value()
  return jnp.asarray(lr)
