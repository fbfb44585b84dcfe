"""Quantizers of SPEC section 1 against NumPy references and their defining properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractrain_jax import quant


def np_quantize(x, bits, lo, hi, u=0.0):
  """SPEC section 1, written independently in float32 NumPy."""
  x, lo, hi = (np.asarray(v, np.float32) for v in (x, lo, hi))
  levels = np.float32(2.0**bits - 1)
  s = np.maximum((hi - lo) / levels, np.float32(1e-8))
  q = np.clip(np.round((x - lo) / s + np.float32(u)), 0, levels)
  return (q * s + lo).astype(np.float32)


@pytest.mark.parametrize("bits", range(1, 17))
def test_matches_numpy_reference(bits):
  rng = np.random.default_rng(bits)
  x = rng.normal(size=(4, 5, 6)).astype(np.float32) * rng.uniform(0.1, 10)
  lo, hi = sorted(rng.uniform(-3, 3, size=2).astype(np.float32))  # x also falls outside: clipping.
  got = jax.jit(lambda v: quant.quantize(v, bits, lo=lo, hi=hi))(x)
  np.testing.assert_array_equal(np.asarray(got), np_quantize(x, bits, lo, hi))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_values_lie_on_the_grid(bits):
  x = jax.random.normal(jax.random.key(bits), (4096,))
  lo, hi = float(x.min()), float(x.max())
  q = np.asarray(quant.quantize(x, bits, lo=lo, hi=hi))
  assert len(np.unique(q)) <= 2**bits
  s = (hi - lo) / (2**bits - 1)
  k = (q - lo) / s
  np.testing.assert_allclose(k, np.round(k), atol=1e-3)
  assert k.min() > -1e-3 and k.max() < 2**bits - 1 + 1e-3


def test_per_sample_bits_equal_quantizing_each_sample_alone():
  x = jax.random.normal(jax.random.key(0), (5, 3, 3, 4))
  bits = jnp.array([1, 4, 0, 8, 16], jnp.int32)
  lo, hi = -1.5, 2.0
  got = quant.quantize(x, bits, lo=lo, hi=hi)
  for i, b in enumerate(np.asarray(bits)):
    want = quant.quantize(x[i], int(b), lo=lo, hi=hi)
    np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))


def test_bits_zero_is_identity_bit_for_bit():
  x = jax.random.normal(jax.random.key(1), (3, 7)) * 1e3
  np.testing.assert_array_equal(quant.quantize(x, 0, lo=-1.0, hi=1.0), x)
  np.testing.assert_array_equal(quant.fake_quant(x, 0), x)
  np.testing.assert_array_equal(
      quant.quantize(x, jnp.zeros((3,), jnp.int32), lo=-1.0, hi=1.0), x)
  y, vjp = jax.vjp(lambda v: quant.quantize_grad(v, 0, None), x)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_array_equal(vjp(x)[0], x)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_is_on_grid_and_unbiased(bits):
  lo, hi = -1.0, 1.0
  s = (hi - lo) / (2**bits - 1)
  n = 200_000
  # Points strictly between grid values, where rounding has to choose.
  x0 = np.float32(lo + 2.37 * s)
  x = jnp.full((n,), x0)
  q = np.asarray(quant.quantize(x, bits, lo=lo, hi=hi, key=jax.random.key(7)), np.float64)
  k = (q - lo) / s
  np.testing.assert_allclose(k, np.round(k), atol=1e-3)
  assert set(np.round(k).astype(int)) == {2, 3}
  # Each draw has variance p(1-p) s^2 <= s^2 / 4: 6 sigma of the mean.
  tol = 6 * 0.5 * s / np.sqrt(n)
  assert abs(q.mean() - x0) < tol
  assert abs((np.round(k) == 3).mean() - 0.37) < 6 * 0.5 / np.sqrt(n)


def test_stochastic_rounding_noise_is_uniform_and_fresh_per_key():
  u1 = np.asarray(quant.uniform_noise(jax.random.key(0), (100_000,)))
  u2 = np.asarray(quant.uniform_noise(jax.random.key(1), (100_000,)))
  assert u1.min() >= -0.5 and u1.max() < 0.5
  # Kolmogorov-Smirnov distance to Uniform(-0.5, 0.5); 1.95/sqrt(n) is the 0.1% level.
  ecdf_gap = np.abs(np.sort(u1) + 0.5 - np.arange(1, u1.size + 1) / u1.size).max()
  assert ecdf_gap < 1.95 / np.sqrt(u1.size)
  assert abs(np.corrcoef(u1, u2)[0, 1]) < 0.02
  assert abs(np.corrcoef(u1[:-1], u1[1:])[0, 1]) < 0.02


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_fake_quant_forward_and_straight_through_gradient(bits):
  x = jax.random.normal(jax.random.key(2), (6, 5))
  c = jax.random.normal(jax.random.key(3), (6, 5))
  y = quant.fake_quant(x, bits)
  np.testing.assert_array_equal(
      np.asarray(y), np_quantize(x, bits, np.min(np.asarray(x)), np.max(np.asarray(x))))
  g = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, bits) * c))(x)
  np.testing.assert_array_equal(g, c)


def test_quantize_weight_is_per_output_channel():
  w = jax.random.normal(jax.random.key(4), (3, 3, 4, 6)) * jnp.arange(1, 7)
  q = np.asarray(quant.quantize_weight(w, 4))
  wn = np.asarray(w)
  for o in range(6):
    lo, hi = wn[..., o].min(), wn[..., o].max()
    want = np_quantize(wn[..., o], 4, lo, hi)
    # Same grid point; the value may differ in the last ulp (XLA fuses q * s + lo to an FMA).
    s = (hi - lo) / 15
    np.testing.assert_array_equal(np.round((q[..., o] - lo) / s), np.round((want - lo) / s))
    np.testing.assert_allclose(q[..., o], want, rtol=1e-6, atol=1e-6)
  g = jax.grad(lambda v: jnp.sum(quant.quantize_weight(v, 4) * 2.0))(w)
  np.testing.assert_array_equal(g, jnp.full_like(w, 2.0))


@pytest.mark.parametrize("bits", [2, 4, 8, jnp.array([2, 8, 0, 4], jnp.int32)])
def test_quantize_grad_is_identity_forward_and_quantizes_the_cotangent(bits):
  y = jax.random.normal(jax.random.key(5), (4, 8, 8, 3))
  cot = jax.random.normal(jax.random.key(6), y.shape) * 3.0
  key = jax.random.key(8)
  out, vjp = jax.vjp(lambda v: quant.quantize_grad(v, bits, key), y)
  np.testing.assert_array_equal(out, y)
  (g,) = vjp(cot)
  g, cn = np.asarray(g, np.float64), np.asarray(cot, np.float64)
  lo, hi = cn.min(), cn.max()
  per_sample = np.broadcast_to(np.asarray(bits), (4,))
  for i, b in enumerate(per_sample):
    if b == 0:
      np.testing.assert_array_equal(g[i], cn[i])
      continue
    s = (hi - lo) / (2**int(b) - 1)
    k = (g[i] - lo) / s
    np.testing.assert_allclose(k, np.round(k), atol=2e-3)
    # Stochastic rounding moves each entry by less than one step.
    assert np.abs(g[i] - cn[i]).max() <= s * (1 + 1e-4)


def _selects(fn, *args) -> int:
  # The text holds the nested jaxprs too (jnp.where is a jit of its own).
  return str(jax.make_jaxpr(fn)(*args)).count("select_n")


@pytest.mark.parametrize("widths", [(3, 4, 4, 6, 6), (2, 8), (0, 2, 8)])
def test_candidate_widths_leave_out_the_pass_through_only_without_zero(widths):
  x = jax.random.normal(jax.random.key(20), (6, 4, 4, 3)) * 2.0
  cot = jax.random.normal(jax.random.key(21), x.shape)
  bits = jnp.asarray(widths, jnp.int32)[jnp.arange(6) % len(widths)]
  key = jax.random.key(22)

  def forward(x, bits, widths=None):
    return quant.quantize(x, bits, lo=-1.5, hi=2.0, widths=widths)

  def backward(cot, bits, widths=None):
    _, vjp = jax.vjp(lambda v: quant.quantize_grad(v, bits, key, widths=widths), x)
    return vjp(cot)[0]

  for fn, arg in ((forward, x), (backward, cot)):
    np.testing.assert_array_equal(np.asarray(fn(arg, bits, widths)), np.asarray(fn(arg, bits)))
    assert _selects(fn, arg, bits) == 1
    assert _selects(lambda a, b: fn(a, b, widths), arg, bits) == (1 if 0 in widths else 0)


def test_per_sample_bits_do_not_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x, bits, key):
    return quant.quantize(x, bits, lo=-1.0, hi=1.0, key=key)

  x = jnp.ones((4, 3)) * 0.3
  for bits in ([1, 2, 3, 4], [8, 8, 8, 8], [0, 16, 5, 2]):
    f(x, jnp.asarray(bits, jnp.int32), jax.random.key(0))


def test_static_bits_retrace_once_per_width():
  traces = []

  def f(x, bits):
    traces.append(bits)
    return quant.fake_quant(x, bits)

  jf = jax.jit(f, static_argnums=1)
  x = jnp.linspace(-1, 1, 16)
  for bits in (2, 4, 2, 4, 8, 8):
    jf(x, bits)
  assert traces == [2, 4, 8]


@pytest.mark.parametrize("bad", [33, -1, 2.5, "8", True, None])
def test_bad_bits_are_refused_with_the_value(bad):
  with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
    quant.quantize(jnp.ones(3), bad, lo=0.0, hi=1.0)
  with pytest.raises(ValueError):
    quant.fake_quant(jnp.ones(3), bad)


def test_float_bit_array_is_refused():
  with pytest.raises(ValueError, match="integer"):
    quant.quantize(jnp.ones((2, 3)), jnp.array([2.0, 3.0]), lo=0.0, hi=1.0)


def test_blend_forward_and_gradients_against_direct_sums():
  widths = (3, 4, 4, 8)
  x = jax.random.normal(jax.random.key(9), (3, 4, 4, 2))
  # Soft weights (not one-hot): the blend is defined for any mask.
  mask = jax.nn.softmax(jax.random.normal(jax.random.key(10), (3, 4)), axis=-1)
  lo, hi = -2.0, 2.5
  g = jax.random.normal(jax.random.key(11), x.shape)
  out, vjp = jax.vjp(lambda x, m: quant.fake_quant_blend(x, m, widths, lo=lo, hi=hi), x, mask)
  qs = [np.asarray(quant.quantize(x, w, lo=lo, hi=hi), np.float64) for w in widths]
  m = np.asarray(mask, np.float64)
  want = sum(m[:, k, None, None, None] * qs[k] for k in range(4))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  dx, dmask = vjp(g)
  gn = np.asarray(g, np.float64)
  np.testing.assert_allclose(dx, gn * m.sum(-1)[:, None, None, None], rtol=1e-6)
  want_dmask = np.stack([(gn * q).sum(axis=(1, 2, 3)) for q in qs], axis=-1)
  np.testing.assert_allclose(dmask, want_dmask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("widths", [(3, 4, 4, 6, 6), (0, 2, 8)])
def test_one_hot_blend_is_the_full_blend_bit_for_bit(widths):
  from fractrain_jax.models import gate
  x = jax.random.normal(jax.random.key(12), (6, 5, 5, 3)) * 2.0
  k = len(widths)
  # The gate's own straight-through mask: exactly one-hot forward, soft gradient.
  logits = jax.random.normal(jax.random.key(13), (6, k))
  lo, hi = -1.5, 2.0
  g = jax.random.normal(jax.random.key(14), x.shape)

  def run(one_hot):
    def f(x, logits):
      mask = gate.gumbel_softmax_st(jax.random.key(15), logits, 0.7)
      return quant.fake_quant_blend(x, mask, widths, lo=lo, hi=hi, one_hot=one_hot)
    out, vjp = jax.vjp(f, x, logits)
    return out, vjp(g)

  out_fast, grads_fast = run(True)
  out_full, grads_full = run(False)
  np.testing.assert_array_equal(np.asarray(out_fast), np.asarray(out_full))
  chex.assert_trees_all_equal(grads_fast, grads_full)


def test_blend_refuses_a_mask_of_the_wrong_shape():
  with pytest.raises(ValueError, match=r"\(batch, K\)"):
    quant.fake_quant_blend(jnp.ones((2, 3)), jnp.ones((2, 4)), (3, 4), lo=0.0, hi=1.0)
