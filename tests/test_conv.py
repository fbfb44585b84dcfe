"""The convs' weight gradient summed over batch chunks (fractrain_jax/conv.py).

The split gradient is checked against a float64 NumPy sum over the batch and
the kernel window, the input gradient and the forward value against XLA's own
conv bit for bit, and the Trainer's choice of split against its mesh.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fractrain_jax import conv, defaults, steps
from fractrain_jax.errors import ConfigError
from fractrain_jax.run import config_check

DN = ("NHWC", "HWIO", "NHWC")


def _conv_args(strides, groups):
  return dict(window_strides=(strides, strides), padding=((1, 1), (1, 1)),
              dimension_numbers=DN, feature_group_count=groups)


def _grads(x, k, g, split, **args):
  with conv.weight_grad_split(split):
    y, vjp = jax.vjp(lambda x, k: conv.conv_general_dilated(x, k, **args), x, k)
  return y, *vjp(g)


def _numpy_weight_grad(x, g, kernel_shape, strides, groups):
  """dW[i, j, c, o] = sum over n, h, w of xpad[n, h*s + i, w*s + j, c] * g[n, h, w, o], per group."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  kh, kw, cin, cout = kernel_shape
  _, ho, wo, _ = g.shape
  per_out = cout // groups
  dw = np.zeros(kernel_shape)
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + (ho - 1) * strides + 1:strides, j:j + (wo - 1) * strides + 1:strides]
      for grp in range(groups):
        xs = patch[..., grp * cin:(grp + 1) * cin]
        gs = g[..., grp * per_out:(grp + 1) * per_out]
        dw[i, j, :, grp * per_out:(grp + 1) * per_out] = np.einsum("nhwc,nhwo->co", xs, gs)
  return dw


@pytest.mark.parametrize("batch,split,strides,groups", [
    (12, 4, 1, 1),   # three equal chunks
    (10, 4, 2, 1),   # a short last chunk, strided
    (9, 2, 1, 3),    # grouped conv
])
def test_split_weight_grad_is_the_sum_over_the_batch(batch, split, strides, groups):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, 7, 7, 6))
  k = jax.random.normal(kk, (3, 3, 6 // groups, 6))
  args = _conv_args(strides, groups)
  y_ref, vjp_ref = jax.vjp(lambda x, k: jax.lax.conv_general_dilated(x, k, **args), x, k)
  g = jax.random.normal(kg, y_ref.shape)
  dx_ref, dk_ref = vjp_ref(g)
  y, dx, dk = _grads(x, k, g, split, **args)
  # The forward pass and the input gradient are XLA's own: bit for bit.
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)
  expected = _numpy_weight_grad(x, g, k.shape, strides, groups)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(dk, expected, rtol=0, atol=2e-6 * scale)
  # XLA's whole-batch form agrees with the same sum to the same tolerance.
  np.testing.assert_allclose(dk_ref, expected, rtol=0, atol=2e-6 * scale)


def test_no_split_is_xla_bit_for_bit_and_outside_a_step_nothing_splits():
  x = jax.random.normal(jax.random.key(1), (16, 6, 6, 4))
  k = jax.random.normal(jax.random.key(2), (3, 3, 4, 5))
  args = _conv_args(1, 1)
  y_ref, vjp_ref = jax.vjp(lambda x, k: jax.lax.conv_general_dilated(x, k, **args), x, k)
  g = jnp.cos(y_ref)
  for split in (0, 16, 32):  # 0: asked for; a split of the whole batch or more: nothing to split.
    _, dx, dk = _grads(x, k, g, split, **args)
    chex.assert_trees_all_equal((dx, dk), vjp_ref(g))
  # Without the context (a model called outside a Trainer step) the conv is XLA's.
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(conv.conv_general_dilated(x, k, **args))))(k))
  assert "custom_vjp" not in jaxpr
  with conv.weight_grad_split(4):
    jaxpr = jax.make_jaxpr(jax.grad(lambda k: jnp.sum(conv.conv_general_dilated(x, k, **args))))(k)
  # The batch of 16 is cut into four chunks of 4 samples, each with its own conv.
  assert str(jaxpr).count("f32[4,6,6,4] = slice") == 4


def test_attached_flax_conv_splits_inside_a_step():
  from fractrain_jax import attach

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.conv = nnx.Conv(4, 4, (3, 3), rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.mean(self.conv(nnx.relu(self.stem(x))), axis=(1, 2)))

  x = jax.random.normal(jax.random.key(3), (8, 5, 5, 3))
  model = attach.attach(Net(nnx.Rngs(0)), x, rules=("q:.*",))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):  # Full precision: the conv alone decides the gradients.
    return jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x, None))

  with conv.weight_grad_split(2):
    split_text = str(jax.make_jaxpr(jax.grad(loss))(params))
    split = jax.grad(loss)(params)
  whole = jax.grad(loss)(params)
  assert split_text.count("conv_general_dilated") > str(
      jax.make_jaxpr(jax.grad(loss))(params)).count("conv_general_dilated")
  chex.assert_trees_all_close(split, whole, rtol=1e-5, atol=1e-6)


def test_trainer_resolves_the_split_for_its_mesh():
  mesh = steps.data_mesh(1)
  platform = jax.devices()[0].platform
  auto = (conv.Split(conv.CPU_SPLIT, conv.CPU_SPLIT_MAX_FEATURES) if platform == "cpu"
          else conv.Split(0))
  assert conv.resolve_split(conv.AUTO, mesh) == auto
  assert conv.resolve_split(0, mesh) == conv.Split(0)
  assert conv.resolve_split(4, mesh) == conv.Split(4)  # Asked for: every conv, any width.
  several = jax.sharding.Mesh(np.array(jax.devices()[:1] * 2), ("data",))
  # Chunks of a sharded batch would cross devices.
  assert conv.resolve_split(4, several) == conv.Split(0)
  assert conv.resolve_split(conv.AUTO, several) == conv.Split(0)


@pytest.mark.parametrize("features,split", [(3, True), (4, True), (5, False), (8, False)])
def test_a_feature_limit_splits_only_the_narrow_convs(features, split):
  """Split(n, m) chunks the weight gradient of a conv whose input has at most m
  features and leaves a wider conv's to XLA, with the same gradient either way."""
  kx, kk, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (8, 5, 5, features))
  k = jax.random.normal(kk, (3, 3, features, 2))
  args = _conv_args(1, 1)
  g = jax.random.normal(kg, (8, 5, 5, 2))
  loss = lambda k: jnp.vdot(conv.conv_general_dilated(x, k, **args), g)
  with conv.weight_grad_split(conv.Split(2, max_features=4)):
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(k))
    dk = jax.grad(loss)(k)
  # The batch of 8 is cut into four chunks of 2 samples, or not at all.
  assert jaxpr.count(f"f32[2,5,5,{features}] = slice") == (4 if split else 0)
  np.testing.assert_allclose(dk, _numpy_weight_grad(x, g, k.shape, 1, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [-2, 1.5, True, "8"])
def test_a_bad_split_is_refused_naming_it(bad):
  with pytest.raises(ValueError, match=f"conv_weight_grad_split={bad!r}"):
    conv.check_split(bad)


def test_the_config_check_refuses_a_split_below_auto():
  config = defaults.get_config()
  config.train.conv_weight_grad_split = -2
  with pytest.raises(ConfigError, match=r"config.train.conv_weight_grad_split=-2; expected an int >= -1"):
    config_check.validate(config)
