"""Learning-rate schedules at hand-picked steps and SGD against a NumPy PyTorch-SGD update."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from fractrain_jax import optim


def optim_config(**changes):
  config = ml_collections.ConfigDict(dict(
      lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="piecewise",
      boundaries=(32000, 48000), decay=0.1, warmup_iters=0, warmup_lr=0.01))
  config.update(changes)
  return config


def values(schedule, steps):
  return [float(schedule(jnp.int32(s))) for s in steps]


def test_piecewise_paper_recipe():
  schedule = optim.make_lr_schedule(optim_config(), 64000)
  steps = [0, 31999, 32000, 47999, 48000, 63999]
  np.testing.assert_allclose(values(schedule, steps),
                             [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_piecewise_with_warmup_keeps_absolute_boundaries():
  schedule = optim.make_lr_schedule(optim_config(warmup_iters=400), 64000)
  steps = [0, 399, 400, 31999, 32000, 48000]
  np.testing.assert_allclose(values(schedule, steps),
                             [0.01, 0.01, 0.1, 0.1, 0.01, 0.001], rtol=1e-6)


def test_boundary_inside_warmup_applies_when_it_ends():
  schedule = optim.make_lr_schedule(
      optim_config(warmup_iters=100, boundaries=(50, 200)), 1000)
  np.testing.assert_allclose(values(schedule, [0, 99, 100, 199, 200]),
                             [0.01, 0.01, 0.01, 0.01, 0.001], rtol=1e-6)


def test_cosine():
  schedule = optim.make_lr_schedule(optim_config(schedule="cosine"), 1000)
  want = [0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.0]
  np.testing.assert_allclose(values(schedule, [0, 250, 500, 1000]), want,
                             rtol=1e-5, atol=1e-7)


def test_cosine_with_warmup_spans_the_rest():
  schedule = optim.make_lr_schedule(
      optim_config(schedule="cosine", warmup_iters=100), 1000)
  # 900 decay steps: halfway at 100 + 450.
  np.testing.assert_allclose(values(schedule, [99, 100, 550, 1000]),
                             [0.01, 0.1, 0.05, 0.0], rtol=1e-5, atol=1e-7)


def test_linear():
  schedule = optim.make_lr_schedule(optim_config(schedule="linear"), 1000)
  np.testing.assert_allclose(values(schedule, [0, 250, 999, 1000]),
                             [0.1, 0.075, 1e-4, 0.0], rtol=1e-5, atol=1e-7)
  warm = optim.make_lr_schedule(
      optim_config(schedule="linear", warmup_iters=200), 1000)
  np.testing.assert_allclose(values(warm, [0, 200, 600, 1000]),
                             [0.01, 0.1, 0.05, 0.0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("changes,total,name", [
    (dict(schedule="step"), 100, "optim.schedule"),
    (dict(warmup_iters=100), 100, "warmup_iters"),
    (dict(boundaries=(20, 10)), 100, "optim.boundaries"),
    ({}, 0, "total_iters"),
])
def test_bad_schedule_arguments(changes, total, name):
  with pytest.raises(ValueError, match=name):
    optim.make_lr_schedule(optim_config(**changes), total)


def torch_sgd(params, grads_seq, lrs, momentum, weight_decay):
  """PyTorch's SGD (dampening 0, no Nesterov) in NumPy float64, step by step."""
  params = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
  bufs = {}
  history = []
  for grads, lr in zip(grads_seq, lrs):
    for k in params:
      d = np.asarray(grads[k], np.float64) + weight_decay * params[k]
      # PyTorch: the first step sets buf = d.
      bufs[k] = d if k not in bufs else momentum * bufs[k] + d
      params[k] = params[k] - lr * bufs[k]
    history.append({k: v.copy() for k, v in params.items()})
  return history


def test_one_and_two_steps_match_pytorch_sgd():
  # Warm-up of one step so the two steps use different lrs (0.01, then 0.1).
  config = optim_config(warmup_iters=1, weight_decay=0.05)
  tx = optim.make_optimizer(config, 100)
  keys = jax.random.split(jax.random.key(0), 5)
  params = {"w": jax.random.normal(keys[0], (3, 2)),
            "b": jax.random.normal(keys[1], (2,))}
  grads_seq = [{"w": jax.random.normal(keys[2], (3, 2)),
                "b": jax.random.normal(keys[3], (2,))},
               {"w": jax.random.normal(keys[4], (3, 2)),
                "b": jnp.asarray([0.5, -2.0])}]
  want = torch_sgd(params, grads_seq, [0.01, 0.1], momentum=0.9, weight_decay=0.05)

  state = tx.init(params)
  assert float(optim.current_lr(state)) == pytest.approx(0.01)
  update = jax.jit(tx.update)
  for step, grads in enumerate(grads_seq):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k in params:
      np.testing.assert_allclose(params[k], want[step][k], rtol=1e-5, atol=1e-6)
    # The lr of the update just applied.
    assert float(optim.current_lr(state)) == pytest.approx([0.01, 0.1][step])


def test_current_lr_through_nnx_optimizer():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  config = optim_config(schedule="piecewise", boundaries=(1,), decay=0.5)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config, 10), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
  lrs = []
  for _ in range(2):
    optimizer.update(model, grads)
    lrs.append(float(optim.current_lr(optimizer.opt_state)))
  assert lrs == pytest.approx([0.1, 0.05])


def test_current_lr_refuses_other_states():
  with pytest.raises(ValueError, match="learning_rate"):
    optim.current_lr(optax.sgd(0.1).init({"w": jnp.zeros(2)}))
