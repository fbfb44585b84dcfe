"""The exact-reproduction options of the gated models: the authors' per-candidate forward
(``forward="per_candidate"``) and the choice of gate head (whose parameter
counts are checked in test_models.py).

Each property is checked against an independent computation: the plain backbone
at a static precision, one block called per candidate.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fractrain_jax import models
from fractrain_jax.layers import GatedBits, StaticBits
from fractrain_jax.models import Plan
from fractrain_jax.models import gate as gate_lib
from fractrain_jax.models.gated import per_candidate_block
from fractrain_jax.models.parts import DEPTHWISE_BITS, BlockBits, layer_key
from fractrain_jax.models.residual import BasicBlock

A = (3, 4, 4, 6, 6)
G = (6, 6, 8, 8, 12)
W = 4
CANDIDATES = tuple(StaticBits(a, g, W) for a, g in zip(A, G))
# Sample i takes candidate CHOICE[i]: every candidate, one of them twice.
CHOICE = np.array([0, 1, 2, 3, 4, 2])
MASK = jnp.asarray(np.eye(5, dtype=np.float32)[CHOICE])


def images(batch: int = 4, size: int = 8, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def features(channels: int, seed: int = 0) -> jax.Array:
  return jax.nn.relu(jax.random.normal(jax.random.key(seed), (len(CHOICE), 6, 6, channels)))


def warmed_block(in_features: int, out_features: int, strides: int) -> BasicBlock:
  """A BasicBlock whose BN statistics and input ranges have seen a few batches, in eval mode."""
  block = BasicBlock(in_features, out_features, strides=strides, rngs=nnx.Rngs(3))
  for seed in range(3):
    block(features(in_features, seed + 10), BlockBits(CANDIDATES[3], CANDIDATES[3],
                                                      DEPTHWISE_BITS), key=jax.random.key(seed))
  block.eval()
  return block


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("k", [0, 4])
def test_forced_per_candidate_equals_plain_backbone_at_static_bits(train, k):
  gated = models.create("gated_resnet20", num_classes=10, rngs=nnx.Rngs(1),
                        forward="per_candidate")
  plain = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(2))
  nnx.update(plain, nnx.state(gated.backbone))
  if not train:
    gated.eval()
    plain.eval()
  x = images()
  logits, masks = gated(x, key=jax.random.key(9), force=k)
  np.testing.assert_array_equal(masks, np.broadcast_to(np.eye(5)[k], (9, 4, 5)))
  # The authors' CIFAR layout: branch and projection shortcut at the candidate's bits.
  bits = CANDIDATES[k]
  # The rounding key shapes only the backward pass.
  want = plain.forward(x, Plan(None, (bits,) * 9, bits, DEPTHWISE_BITS), key=jax.random.key(0))
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_per_candidate_and_single_pass_agree_per_sample_where_they_must():
  """In eval mode every sample's output is its own candidate's block output; the single
  pass computes the same where the shortcut is the identity, not where it projects."""
  for in_f, out_f, strides, same in ((8, 8, 1, True), (8, 16, 2, False)):
    block = warmed_block(in_f, out_f, strides)
    h = features(in_f)
    per_candidate = per_candidate_block(block, h, MASK, CANDIDATES, DEPTHWISE_BITS, key=None)
    for i, k in enumerate(CHOICE):
      alone = block(h, BlockBits(CANDIDATES[k], CANDIDATES[k], DEPTHWISE_BITS), key=None)
      np.testing.assert_allclose(per_candidate[i], alone[i], rtol=1e-6, atol=1e-6)
    single = block(h, BlockBits(GatedBits(MASK, A, G, W), None, DEPTHWISE_BITS), key=None)
    if same:
      np.testing.assert_allclose(single, per_candidate, rtol=1e-5, atol=1e-5)
    else:  # The single pass keeps the shortcut in full precision.
      assert not np.allclose(single, per_candidate, rtol=1e-3, atol=1e-3)


def _mask_grad(block: BasicBlock, fn, h, r) -> jax.Array:
  graphdef, state = nnx.split(block)

  def loss(mask):
    return jnp.sum(fn(nnx.merge(graphdef, state, copy=True), mask) * r)

  return jax.grad(loss)(MASK)


def test_gate_gradient_comes_from_the_candidate_outputs():
  """d loss / d mask[i, k] = <upstream_i, block_k(h)_i> per candidate (training mode),
  where the single pass differentiates the blended conv inputs instead."""
  block = BasicBlock(8, 16, strides=2, rngs=nnx.Rngs(4))
  h = features(8)
  key = jax.random.key(6)
  r = jax.random.normal(jax.random.key(7), (len(CHOICE), 3, 3, 16))
  got = _mask_grad(block, lambda b, m: per_candidate_block(b, h, m, CANDIDATES, DEPTHWISE_BITS,
                                                            key=key), h, r)
  want = np.zeros((len(CHOICE), 5), np.float32)
  for k, bits in enumerate(CANDIDATES):
    copy = nnx.merge(*nnx.split(block), copy=True)
    out = copy(h, BlockBits(bits, bits, DEPTHWISE_BITS), key=layer_key(key, k))
    want[:, k] = np.sum(np.asarray(out * r), axis=(1, 2, 3))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  single = _mask_grad(block, lambda b, m: b(h, BlockBits(GatedBits(m, A, G, W), None,
                                                         DEPTHWISE_BITS), key=key), h, r)
  assert np.all(np.isfinite(single)) and np.any(single != 0)
  assert not np.allclose(single, want, rtol=0.1, atol=0.1)


def test_per_candidate_trains_every_part_and_charges_shortcuts_to_their_block():
  gated = models.create("gated_resnet8", num_classes=10, rngs=nnx.Rngs(1),
                        forward="per_candidate")
  graphdef, params, rest = nnx.split(gated, nnx.Param, ...)
  x, labels = images(), jnp.array([1, 3, 5, 7])

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest, copy=True)(x, key=jax.random.key(2))
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

  for path, g in nnx.to_flat_state(jax.grad(loss)(params)):
    assert np.all(np.isfinite(g[...])), path
    assert np.any(g[...] != 0), f"no gradient reaches {path}"
  single = models.create("gated_resnet8", num_classes=10, rngs=nnx.Rngs(1))
  kinds = {l.name: (l.kind, l.block) for l in gated.layer_macs()}
  assert kinds["blocks.1.shortcut"] == ("gated", 1)  # The first downsampling block.
  assert {l.name: (l.kind, l.block) for l in single.layer_macs()}["blocks.1.shortcut"] == ("fp", -1)
  assert ([(l.name, l.macs) for l in gated.layer_macs()]
          == [(l.name, l.macs) for l in single.layer_macs()])


def test_gate_head_can_be_chosen_and_bad_options_are_refused():
  gated = nnx.eval_shape(lambda: models.create("gated_resnet18", num_classes=10,
                                               rngs=nnx.Rngs(0), gate_head="cifar"))
  assert gated.gate.hidden_size == 16 and gated.gate.heads[0].hidden is not None
  assert nnx.eval_shape(lambda: models.create(
      "gated_resnet18", num_classes=10, rngs=nnx.Rngs(0))).gate.heads[0].hidden is None
  with pytest.raises(ValueError, match="gate_head='wide'.*'cifar', 'imagenet', 'mobilenet'"):
    models.create("gated_resnet8", num_classes=10, rngs=nnx.Rngs(0), gate_head="wide")
  with pytest.raises(ValueError, match="forward='twice'.*'single', 'per_candidate'"):
    models.create("gated_resnet8", num_classes=10, rngs=nnx.Rngs(0), forward="twice")
  assert tuple(gate_lib.HEADS) == ("cifar", "imagenet", "mobilenet", "lm")


@pytest.mark.parametrize("terms", [1, 2])
def test_torch_uniform_has_pytorchs_moments(terms):
  """U(-b, b) has variance b^2 / 3; PyTorch's LSTM bias b_ih + b_hh is the sum of two."""
  bound = 1 / np.sqrt(20)
  x = np.asarray(gate_lib.torch_uniform(20, terms)(jax.random.key(0), (200_000,)))
  assert np.abs(x).max() <= terms * bound
  np.testing.assert_allclose(x.mean(), 0.0, atol=4 * np.sqrt(terms / 3 / 200_000) * bound)
  np.testing.assert_allclose(x.var(), terms * bound**2 / 3, rtol=0.02)


def test_authors_gate_init_draws_biases_and_lstm_as_pytorch():
  reads = (16, 32)
  default = gate_lib.Gate(reads, 5, rngs=nnx.Rngs(0))
  authors = gate_lib.Gate(reads, 5, init="authors", rngs=nnx.Rngs(0))
  for gate in (default, authors):
    chex.assert_trees_all_equal_shapes(nnx.state(default, nnx.Param), nnx.state(gate, nnx.Param))
  for head, c in zip(authors.heads, reads):
    for linear, fan_in in ((head.hidden, c), (head.embed, 32)):
      b = np.asarray(linear.bias[...])
      assert np.abs(b).max() <= 1 / np.sqrt(fan_in) and np.any(b != 0)
  hidden = authors.hidden_size
  lstm = authors.lstm
  for name in ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho"):
    k = np.asarray(getattr(lstm, name).kernel[...])
    assert np.abs(k).max() <= 1 / np.sqrt(hidden), name
  biases = np.concatenate([np.asarray(getattr(lstm, n).bias[...]) for n in ("hi", "hf", "hg", "ho")])
  assert np.abs(biases).max() <= 2 / np.sqrt(hidden) and np.abs(biases).max() > 1 / np.sqrt(hidden)
  assert np.abs(np.asarray(authors.project.bias[...])).max() <= 1 / np.sqrt(hidden)
  # The default keeps zero biases, and its LSTM is not bounded like PyTorch's.
  assert not np.any(np.asarray(default.project.bias[...]))
  assert np.abs(np.asarray(default.lstm.hi.kernel[...])).max() > 1 / np.sqrt(hidden)
