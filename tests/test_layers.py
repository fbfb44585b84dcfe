"""QConv: the quantized conv's forward, backward and running ranges (SPEC sections 1, 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fractrain_jax import quant
from fractrain_jax.layers import (CLASSIFIER, DEPTHWISE, SHORTCUT, Dense, GatedBits, QConv,
                                  StaticBits)
from fractrain_jax.models.capture import capture_records


def plain_conv(x, w, stride=1, pad=1):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def run(conv, fn, *args):
  """Calls fn(module, *args) functionally; returns (output, updated module)."""
  graphdef, state = nnx.split(conv)
  out, state = jax.jit(lambda s, *a: (fn(m := nnx.merge(graphdef, s, copy=True), *a),
                                      nnx.state(m)))(state, *args)
  return out, nnx.merge(graphdef, state)


@pytest.mark.parametrize("a,g,w", [(4, 8, 4), (8, 8, 8), (3, 6, 2)])
def test_static_forward_and_gradients(a, g, w):
  conv = QConv(3, 4, 3, strides=2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  cot = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))
  key = jax.random.key(3)
  graphdef, params, rest = nnx.split(conv, nnx.Param, ...)

  def apply(x, params):
    return nnx.merge(graphdef, params, rest, copy=True)(x, StaticBits(a, g, w), key=key)

  y, vjp = jax.vjp(apply, x, params)
  dx, dparams = vjp(cot)
  kernel = conv.kernel[...]
  xq = quant.fake_quant(x, a)
  wq = quant.quantize_weight(kernel, w)
  np.testing.assert_allclose(y, plain_conv(xq, wq, stride=2), rtol=1e-5, atol=1e-5)
  # Both gradient products see the cotangent quantized at g bits with the layer's key.
  gq = quant.quantize(cot, g, lo=cot.min(), hi=cot.max(), key=key)
  _, ref_vjp = jax.vjp(lambda x, k: plain_conv(x, k, stride=2), xq, wq)
  rdx, rdk = ref_vjp(gq)
  np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dparams["kernel"][...], rdk, rtol=1e-4, atol=1e-4)


def test_running_range_is_updated_in_training_and_used_in_eval():
  conv = QConv(2, 2, 1, act_momentum=0.9, rngs=nnx.Rngs(0))
  x1 = jax.random.uniform(jax.random.key(0), (4, 3, 3, 2), minval=-1.0, maxval=3.0)
  key = jax.random.key(1)
  _, conv = run(conv, lambda m, x: m(x, StaticBits(4, 8, 4), key=key), x1)
  lo, hi = float(x1.min()), float(x1.max())
  assert float(conv.act_lo[...]) == pytest.approx(0.1 * lo, rel=1e-5)
  assert float(conv.act_range[...]) == pytest.approx(0.1 * (hi - lo), rel=1e-5)
  conv.eval()
  before = (float(conv.act_lo[...]), float(conv.act_range[...]))
  x2 = x1 * 5.0
  y, conv = run(conv, lambda m, x: m(x, StaticBits(4, 8, 4)), x2)
  assert (float(conv.act_lo[...]), float(conv.act_range[...])) == before
  run_lo, run_hi = before[0], before[0] + before[1]
  xq = quant.quantize(x2, 4, lo=run_lo, hi=run_hi)
  wq = quant.quantize_weight(conv.kernel[...], 4)
  np.testing.assert_allclose(y, plain_conv(xq, wq, pad=0), rtol=1e-5, atol=1e-5)


def test_gated_blend_equals_each_samples_static_precision():
  conv = QConv(3, 4, 3, rngs=nnx.Rngs(0))
  a, g, w = (3, 4, 4, 6, 6), (6, 6, 8, 8, 12), 4
  x = jax.random.normal(jax.random.key(1), (5, 6, 6, 3))
  choice = jnp.array([0, 2, 4, 1, 3])
  mask = jax.nn.one_hot(choice, 5)
  key = jax.random.key(2)
  cot = jax.random.normal(jax.random.key(3), (5, 6, 6, 4))

  graphdef, state = nnx.split(conv)

  def apply(x, mask):
    return nnx.merge(graphdef, state, copy=True)(x, GatedBits(mask, a, g, w), key=key)

  y, vjp = jax.vjp(apply, x, mask)
  dx, dmask = vjp(cot)
  lo, hi = x.min(), x.max()
  wq = quant.quantize_weight(conv.kernel[...], w)
  for n, k in enumerate(np.asarray(choice)):
    xq = quant.quantize(x[n:n + 1], a[k], lo=lo, hi=hi)
    np.testing.assert_allclose(y[n:n + 1], plain_conv(xq, wq), rtol=1e-5, atol=1e-5)
    # The gate's gradient: <dL/dy_q, conv(Q_{a_j}(x))> for each candidate j.
    gq = quant.quantize(cot, jnp.asarray(g)[choice], lo=cot.min(), hi=cot.max(), key=key)
    for j in range(5):
      xj = quant.quantize(x[n:n + 1], a[j], lo=lo, hi=hi)
      want = jnp.sum(gq[n:n + 1] * plain_conv(xj, wq))
      np.testing.assert_allclose(dmask[n, j], want, rtol=1e-3, atol=1e-3)


def test_macs_captured_from_the_input_shape():
  forward = lambda m, x: m(x)
  conv = QConv(16, 32, 3, strides=2, role=SHORTCUT, rngs=nnx.Rngs(0))
  assert capture_records(conv, forward, (1, 32, 32, 16)) == [((), 16 * 16 * 9 * 16 * 32,
                                                              SHORTCUT)]
  dw = QConv(8, 8, 3, feature_group_count=8, role=DEPTHWISE, rngs=nnx.Rngs(0))
  assert capture_records(dw, forward, (1, 10, 10, 8)) == [((), 10 * 10 * 9 * 8, DEPTHWISE)]
  fc = Dense(20, 7, rngs=nnx.Rngs(0))
  assert capture_records(fc, forward, (1, 20)) == [((), 20 * 7, CLASSIFIER)]
  # Per sample: positions between batch and features count (a dense over a sequence).
  assert capture_records(fc, forward, (3, 5, 20)) == [((), 5 * 20 * 7, CLASSIFIER)]


def test_unknown_role_is_refused():
  with pytest.raises(ValueError, match="role='bogus'"):
    QConv(2, 2, 1, role="bogus", rngs=nnx.Rngs(0))


def test_training_step_without_key_is_refused():
  conv = QConv(2, 2, 1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="PRNG key"):
    run(conv, lambda m, x: m(x, StaticBits(4, 8, 4)), jnp.ones((1, 2, 2, 2)))
