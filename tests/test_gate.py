"""The DFQ gate and the gated models: sampling, the LSTM, one-pass blending, gradients, modes.

Behaviour is checked on gated ResNet-20 at 8x8 inputs, batch 2-4.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fractrain_jax import cost, models
from fractrain_jax.layers import StaticBits
from fractrain_jax.models import Plan
from fractrain_jax.models import gate as gate_lib
from fractrain_jax.models.parts import DEPTHWISE_BITS, BlockBits

A = (3, 4, 4, 6, 6)
G = (6, 6, 8, 8, 12)
W = 4


def images(batch: int = 2, size: int = 8, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def gated_and_plain(sampler: str = "gumbel"):
  """gated_resnet20 and a plain resnet20 holding the same backbone weights."""
  gated = models.create("gated_resnet20", num_classes=10, rngs=nnx.Rngs(1), gate=sampler)
  plain = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(2))
  nnx.update(plain, nnx.state(gated.backbone))
  return gated, plain


def assert_one_hot(masks):
  masks = np.asarray(masks)
  assert set(np.unique(masks)) <= {0.0, 1.0}
  np.testing.assert_array_equal(masks.sum(-1), 1.0)


def param_grads(model, fn, *args):
  """Gradients of ``fn(model, *args)`` w.r.t. the model's Params (BatchStats may change)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    return fn(nnx.merge(graphdef, p, rest, copy=True), *args)

  return jax.grad(loss)(params)


# Sampling functions (Gumbel and hard straight-through): see the end of this file.


# ------------------------------------------------------------------ the gate's LSTM


def _np_lstm_step(cell, c, h, x):
  """PyTorch LSTM equations with the cell's weights, in NumPy."""
  w = lambda lin: np.asarray(lin.kernel[...])
  b = lambda lin: np.asarray(lin.bias[...])
  sig = lambda v: 1 / (1 + np.exp(-v))
  i = sig(x @ w(cell.ii) + h @ w(cell.hi) + b(cell.hi))
  f = sig(x @ w(cell.if_) + h @ w(cell.hf) + b(cell.hf))
  g = np.tanh(x @ w(cell.ig) + h @ w(cell.hg) + b(cell.hg))
  o = sig(x @ w(cell.io) + h @ w(cell.ho) + b(cell.ho))
  c = f * c + i * g
  return c, o * np.tanh(c)


def test_gate_logits_match_a_numpy_recurrence():
  channels = (4, 8, 8)
  gate = gate_lib.Gate(channels, 5, rngs=nnx.Rngs(0))
  feats = [np.asarray(jax.random.normal(jax.random.key(i), (3, 2, 2, c)))
           for i, c in enumerate(channels)]
  state = gate.initial_state(3)
  c = h = np.zeros((3, 16), np.float32)
  for index, f in enumerate(feats):
    logits, state = gate.logits(index, jnp.asarray(f), state)
    head = gate.heads[index]
    pooled = f.mean((1, 2))
    hidden = np.maximum(pooled @ np.asarray(head.hidden.kernel[...]) + head.hidden.bias[...], 0)
    emb = hidden @ np.asarray(head.embed.kernel[...]) + np.asarray(head.embed.bias[...])
    c, h = _np_lstm_step(gate.lstm, c, h, emb)
    want = h @ np.asarray(gate.project.kernel[...]) + np.asarray(gate.project.bias[...])
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


def test_decisions_read_block_inputs_and_state_restarts_each_call():
  gated, _ = gated_and_plain()
  gated.eval()
  x = images(3)
  _, first = gated(x)
  gated(images(3, seed=7))  # Another input in between: nothing may carry over.
  _, masks = gated(x)
  np.testing.assert_array_equal(masks, first)
  # The decisions by hand: decision l from the input of block l, LSTM state from zero.
  bb = gated.backbone
  h = bb.stem(x, None, key=None)
  state = gated.gate.initial_state(3)
  for l, block in enumerate(bb.blocks):
    logits, state = gated.gate.logits(l, h, state)
    mask = jax.nn.one_hot(jnp.argmax(logits, -1), 5)
    np.testing.assert_array_equal(masks[l], mask)
    h = block(h, BlockBits(gated.block_bits(mask), None, DEPTHWISE_BITS), key=None)


# ------------------------------------------------------------------ the gated model


@pytest.mark.parametrize("sampler", ["gumbel", "hard"])
@pytest.mark.parametrize("train", [True, False])
def test_gated_output_shapes_and_one_hot_masks(sampler, train):
  gated, _ = gated_and_plain(sampler)
  if not train:
    gated.eval()
  logits, masks = nnx.jit(lambda m, x, k: m(x, key=k))(gated, images(4), jax.random.key(0))
  chex.assert_shape(logits, (4, 10))
  chex.assert_shape(masks, (9, 4, 5))
  chex.assert_tree_all_finite(logits)
  assert_one_hot(masks)


def test_eval_mode_is_deterministic_argmax():
  gated, _ = gated_and_plain()
  assert gated.gate.deterministic is False
  gated.eval()
  assert gated.gate.deterministic is True
  x = images(4)
  _, m1 = gated(x, key=jax.random.key(1))
  _, m2 = gated(x, key=jax.random.key(2))
  _, m3 = gated(x)
  np.testing.assert_array_equal(m1, m2)
  np.testing.assert_array_equal(m1, m3)
  gated.train()
  assert gated.gate.deterministic is False


def test_training_samplers_and_keys():
  x = images(4)
  gumbel, _ = gated_and_plain("gumbel")
  with pytest.raises(ValueError, match="PRNG key"):
    gumbel(x)
  # Gumbel noise differs between keys; the authors' hard gate ignores the key.
  draws = [np.asarray(gumbel(x, key=jax.random.key(i))[1]) for i in range(3)]
  assert not all(np.array_equal(draws[0], d) for d in draws[1:])
  hard, _ = gated_and_plain("hard")
  np.testing.assert_array_equal(hard(x, key=jax.random.key(1))[1],
                                hard(x, key=jax.random.key(2))[1])


@pytest.mark.parametrize("force", [5, -1, 1.0, True])
def test_force_must_be_a_candidate_index(force):
  gated, _ = gated_and_plain()
  with pytest.raises(ValueError, match="candidate index"):
    gated(images(), key=jax.random.key(0), force=force)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("k", range(5))
def test_forced_gate_equals_plain_backbone_at_static_bits(train, k):
  gated, plain = gated_and_plain()
  if not train:
    gated.eval()
    plain.eval()
  x = images(4)
  key = jax.random.key(9)
  logits, masks = gated(x, key=key, force=k)
  np.testing.assert_array_equal(masks, np.broadcast_to(np.eye(5)[k], (9, 4, 5)))
  plan = Plan.blockwise([StaticBits(A[k], G[k], W)] * 9)
  want = plain.forward(x, plan, key=jax.random.split(key)[1])
  np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
  # Both saw the same batch in training, so they updated the same running statistics.
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(gated.backbone, nnx.BatchStat)),
                               nnx.to_flat_state(nnx.state(plain, nnx.BatchStat))):
    np.testing.assert_allclose(a[...], b[...], rtol=1e-6, atol=1e-7, err_msg=str(path))


@pytest.mark.parametrize("train", [True, False])
def test_full_precision_equals_plain_fp32_backbone(train):
  gated, plain = gated_and_plain()
  if not train:
    gated.eval()
    plain.eval()
  x = images(4)
  logits, masks = gated(x, key=jax.random.key(3), full_precision=True)
  np.testing.assert_allclose(logits, plain(x), rtol=1e-6, atol=1e-6)
  chex.assert_shape(masks, (9, 4, 5))
  assert_one_hot(masks)  # The gate still runs, for monitoring.


def test_forced_gate_backbone_gradients_equal_plain_ones():
  gated, plain = gated_and_plain()
  x, labels = images(4), jnp.array([1, 3, 5, 7])
  key = jax.random.key(4)
  k = 3  # (a, g) = (6, 8)
  ce = lambda logits: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None],
                                                    axis=1))
  g_gated = param_grads(gated, lambda m: ce(m(x, key=key, force=k)[0]))
  plan = Plan.blockwise([StaticBits(A[k], G[k], W)] * 9)
  g_plain = param_grads(plain, lambda m: ce(m.forward(x, plan, key=jax.random.split(key)[1])))
  flat_plain = dict(nnx.to_flat_state(g_plain))
  flat_gated = nnx.to_flat_state(g_gated["backbone"])
  assert len(flat_gated) == len(flat_plain)
  for path, v in flat_gated:
    want = np.asarray(flat_plain[path][...])
    np.testing.assert_allclose(v[...], want, rtol=1e-6, atol=1e-7 * np.abs(want).max(),
                               err_msg=str(path))
  # A forced gate is not run, so it gets no gradient.
  assert all(not np.any(v[...]) for _, v in nnx.to_flat_state(g_gated["gate"]))


@pytest.mark.parametrize("sampler", ["gumbel", "hard"])
def test_gate_gets_gradients_from_task_loss_and_cost(sampler):
  gated, _ = gated_and_plain(sampler)
  x, labels = images(4), jnp.array([0, 2, 4, 6])
  key = jax.random.key(5)
  per_candidate = jnp.asarray([a * W + g * W + a * g for a, g in zip(A, G)], jnp.float32)

  def task(m):
    logits, _ = m(x, key=key)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

  def cost_term(m):
    _, masks = m(x, key=key)
    return jnp.sum(masks * per_candidate)

  for fn in (task, cost_term):
    grads = nnx.to_flat_state(param_grads(gated, fn)["gate"])
    assert len(grads) == 9 * 4 + 8 + 4 + 2  # Heads (2 Linear each), LSTM, projection.
    for path, g in grads:
      assert np.all(np.isfinite(g[...])), path
      assert np.any(g[...] != 0), f"{fn.__name__}: no gradient reaches {path}"


def test_cost_of_forced_masks_matches_per_layer_sum():
  gated, _ = gated_and_plain()
  layers = gated.layer_macs()
  for k in range(5):
    masks = jnp.broadcast_to(jnp.eye(5)[k], (9, 3, 5))
    got = cost.gated_cost(layers, masks, A, G, W)
    want = sum((l.macs * (A[k] * W + G[k] * W + A[k] * G[k]) if l.kind == "gated"
                else 3 * l.macs * 32 * 32) for l in layers) / 1024
    np.testing.assert_allclose(got.total, np.full(3, want), rtol=1e-6)


def test_changing_tau_does_not_recompile():
  gated, _ = gated_and_plain()
  graphdef, params, rest = nnx.split(gated, nnx.Param, ...)
  x = images(2)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def gate_grads(p, rest, key, tau):
    def loss(p):
      m = nnx.merge(graphdef, p, rest, copy=True)
      _, masks = m(x, key=key, tau=tau)
      return jnp.sum(masks * jnp.arange(5.0))
    return jax.grad(loss)(p)["gate"]["project"]["kernel"][...]

  chex.clear_trace_counter()
  key = jax.random.key(0)
  grads = [gate_grads(params, rest, key, jnp.float32(t)) for t in (1.0, 0.5, 0.1)]
  # tau reaches the computation: the Gumbel-softmax gradient scales with 1 / tau.
  assert not np.allclose(grads[0], grads[1])
  assert not np.allclose(grads[1], grads[2])


# ---- the samplers: one-hot forward, straight-through gradient ----

LOGITS = jnp.asarray([[1.0, 0.0, -1.0, 0.5],
                      [-2.0, 3.0, 0.1, 0.2],
                      [0.3, 0.3, 0.2, -0.4]], jnp.float32)


def test_gumbel_forward_is_exactly_one_hot_of_noisy_argmax():
  key = jax.random.key(0)
  mask = jax.jit(gate_lib.gumbel_softmax_st)(key, LOGITS, 0.7)
  noise = jax.random.gumbel(key, LOGITS.shape, jnp.float32)
  want = np.eye(4, dtype=np.float32)[np.argmax(np.asarray(LOGITS + noise), axis=-1)]
  # Exact equality: the mask scales the candidates' quantized inputs.
  np.testing.assert_array_equal(np.asarray(mask), want)


def test_gumbel_argmax_frequencies_match_softmax():
  # N samples per row; each class frequency is a binomial mean with standard
  # error sqrt(p (1 - p) / N) <= 0.0035. Tolerance: 5 standard errors.
  n = 20000
  keys = jax.random.split(jax.random.key(1), n)
  masks = jax.jit(jax.vmap(lambda k: gate_lib.gumbel_softmax_st(k, LOGITS, 1.0)))(keys)
  freq = np.asarray(masks).mean(axis=0)
  logits = np.asarray(LOGITS, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  tolerance = 5 * np.sqrt(p * (1 - p) / n)
  assert np.all(np.abs(freq - p) <= tolerance), (freq, p)


def softmax_jacobian_vjp(z, v, tau):
  """v^T d softmax(z / tau) / dz, row by row, in float64 NumPy."""
  s = np.exp((z - z.max(-1, keepdims=True)) / tau)
  s /= s.sum(-1, keepdims=True)
  out = np.empty_like(z)
  for i in range(z.shape[0]):
    jac = (np.diag(s[i]) - np.outer(s[i], s[i])) / tau  # symmetric
    out[i] = jac @ v[i]
  return out


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_gumbel_gradient_is_the_tempered_softmax_jacobian(tau):
  key = jax.random.key(2)
  v = np.asarray(jax.random.normal(jax.random.key(3), LOGITS.shape), np.float64)
  _, vjp = jax.vjp(lambda l: gate_lib.gumbel_softmax_st(key, l, tau), LOGITS)
  (got,) = vjp(jnp.asarray(v, jnp.float32))
  noise = np.asarray(jax.random.gumbel(key, LOGITS.shape, jnp.float32), np.float64)
  want = softmax_jacobian_vjp(np.asarray(LOGITS, np.float64) + noise, v, tau)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_gumbel_accepts_traced_tau():
  key = jax.random.key(4)
  f = jax.jit(lambda l, t: jnp.sum(gate_lib.gumbel_softmax_st(key, l, t)[:, 0]))
  g_fixed = jax.grad(lambda l: jnp.sum(gate_lib.gumbel_softmax_st(key, l, 0.8)[:, 0]))(LOGITS)
  np.testing.assert_allclose(jax.grad(f)(LOGITS, jnp.float32(0.8)), g_fixed, rtol=1e-6)


def test_hard_argmax_forward_and_gradient():
  mask = jax.jit(gate_lib.hard_argmax_st)(LOGITS)
  want = np.eye(4, dtype=np.float32)[np.argmax(np.asarray(LOGITS), axis=-1)]
  np.testing.assert_array_equal(np.asarray(mask), want)
  v = np.asarray(jax.random.normal(jax.random.key(5), LOGITS.shape), np.float64)
  _, vjp = jax.vjp(gate_lib.hard_argmax_st, LOGITS)
  (got,) = vjp(jnp.asarray(v, jnp.float32))
  np.testing.assert_allclose(
      got, softmax_jacobian_vjp(np.asarray(LOGITS, np.float64), v, 1.0),
      rtol=1e-4, atol=1e-6)
