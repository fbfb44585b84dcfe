"""DFQ's training signals (SPEC sections 4 and 5): gate sampling, cost loss, targets.

Pure functions, safe under ``jit``: cp, targets, temperatures and steps may be
traced. Rules, bit widths and other options are Python values (static).

* ``gumbel_tau``: the Gumbel-softmax temperature, annealed exponentially.
* ``cost_sign`` / ``cost_loss``: the term ``sign * beta * cost`` that pushes
  the batch's steering cp towards its target (``cost`` is the batch's total,
  ``cost.steer_cost_sum``).
* ``frac_target``: FracTrain's target, raised at each turning point.
"""

from __future__ import annotations

import numbers
from typing import Union

import jax
import jax.numpy as jnp
import optax

Scalar = Union[float, int, jax.Array]

RULES = ("frac", "dfq")
# DFQ script: sign magnitude inside the +-relax band around the target.
BAND_SIGN = 0.1


def _check_concrete(name: str, value: Scalar, *, positive: bool) -> None:
  """Refuses a bad Python number early; traced values pass unchecked."""
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    bad = value <= 0 if positive else value < 0
    if bad:
      raise ValueError(
          f"{name}={value!r}; expected a number {'> 0' if positive else '>= 0'}")


def cost_sign(cp: Scalar, target: Scalar, *, rule: str, relax: Scalar = 0.0,
              range_: Scalar = 0.0) -> jax.Array:
  """Direction in which the cost term pushes: float32 scalar (SPEC section 4).

  rule='frac' (FracTrain script): -1 when ``cp < target``, +1 when
  ``cp >= target + range_``, 0 in between.
  rule='dfq' (DFQ script): -1 when ``cp < target - relax``, +1 when
  ``cp >= target + relax``; inside that band -0.1 below the target and +0.1 at
  or above it.
  All comparisons are in float32.
  """
  if rule not in RULES:
    raise ValueError(f"rule={rule!r}; expected one of {RULES}")
  _check_concrete("relax", relax, positive=False)
  _check_concrete("range_", range_, positive=False)
  cp = jnp.asarray(cp, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  if rule == "frac":
    lower, upper = target, target + jnp.asarray(range_, jnp.float32)
    inside = jnp.float32(0.0)
  else:
    relax = jnp.asarray(relax, jnp.float32)
    lower, upper = target - relax, target + relax
    inside = jnp.where(cp < target, -BAND_SIGN, BAND_SIGN)
  sign = jnp.where(cp < lower, -1.0, jnp.where(cp >= upper, 1.0, inside))
  return sign.astype(jnp.float32)


def cost_loss(cost: jax.Array, cp: Scalar, target: Scalar, *, beta: Scalar, rule: str,
              relax: Scalar = 0.0, range_: Scalar = 0.0) -> jax.Array:
  """``sign * beta * cost`` with the sign held constant (train_frac.py:432).

  ``cost`` is the batch's total gated cost, summed over samples and blocks
  (``cost.steer_cost_sum``), differentiable in the gate's masks; ``cp`` is the
  batch's steering cp that the sign compares with ``target``. The sign is a
  step function of cp, so it only chooses the direction and carries no
  gradient.
  """
  _check_concrete("beta", beta, positive=False)
  sign = jax.lax.stop_gradient(
      cost_sign(jax.lax.stop_gradient(cp), jax.lax.stop_gradient(target),
                rule=rule, relax=relax, range_=range_))
  return sign * jnp.float32(beta) * jnp.asarray(cost, jnp.float32)


def frac_target(stage: Scalar, target0: Scalar, step: Scalar) -> Scalar:
  """FracTrain's target cp in stage ``stage``: ``target0 + stage * step`` (SPEC section 5)."""
  if isinstance(stage, numbers.Integral) and not isinstance(stage, bool) and stage < 0:
    raise ValueError(f"stage={stage!r}; expected an int >= 0")
  return target0 + stage * step


def gumbel_tau(step: Scalar, total_iters: int, tau_start: float,
               tau_end: float) -> jax.Array:
  """Temperature at ``step``: ``tau_start * (tau_end / tau_start) ** (step / total_iters)``.

  Held at ``tau_start`` before step 0 and at ``tau_end`` after ``total_iters``.
  """
  if not (isinstance(total_iters, numbers.Integral) and total_iters > 0):
    raise ValueError(f"total_iters={total_iters!r}; expected an int > 0")
  _check_concrete("tau_start", tau_start, positive=True)
  _check_concrete("tau_end", tau_end, positive=True)
  schedule = optax.exponential_decay(
      init_value=float(tau_start), transition_steps=int(total_iters),
      decay_rate=float(tau_end) / float(tau_start), end_value=float(tau_end))
  return jnp.asarray(schedule(step), jnp.float32)
