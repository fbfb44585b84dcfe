"""The quantizer's one-pass CPU kernels (fractrain_jax/onednn/quantize.cc) and how
quant.py routes to them.

The quantization is checked bit for bit against quant.py's XLA path on JAX 0.10 (the
reference the fixed-seed runs of earlier versions used; to float32 rounding on newer
JAX) over widths 1..32, nearest and stochastic rounding, one width per tensor or per
sample, with and without samples passed through at width 0; DFQ's blend backward
against a float64 NumPy sum of the XLA path's quantizations. Runs are long enough to
be split among threads (over 16,384 elements).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractrain_jax import kernels, quant
from fractrain_jax.onednn import library

needs_kernels = pytest.mark.skipif(not library.status().ok, reason=library.status().reason)

SHAPE = (3, 80, 80, 3)  # 19,200 elements a sample: two pieces of the kernel's split.


def _x(seed=0, shape=SHAPE, scale=3.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale)


def _both(fn, *args):
  """``fn`` jitted on XLA's kernels and inside a step on the "onednn" kernels."""
  def on_kernels(*a):
    with kernels.use(kernels.ONEDNN):
      return fn(*a)
  return jax.jit(fn)(*args), jax.jit(on_kernels)(*args)


# JAX 0.10's XLA compiles quant.py's expression to the kernel's bits. JAX 0.12's rounds
# some elements' last bit differently (seen at 8 bits: 1-2 of 57,600 with the tests'
# optimizations off, more with them on); there the values must agree to float32 rounding.
EXACT = tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 11)


def _assert_same(kernel, xla):
  if EXACT:
    np.testing.assert_array_equal(kernel, xla)
  else:
    np.testing.assert_allclose(kernel, xla, rtol=2e-6, atol=1e-6)


def _range_quantize(bits, key=None, widths=None):
  return lambda x, b=None: quant.quantize(x, bits if b is None else b, lo=jnp.min(x),
                                          hi=jnp.max(x), key=key, widths=widths)


@needs_kernels
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16, 32])
@pytest.mark.parametrize("stochastic", [False, True])
def test_the_kernel_quantizes_to_the_bit_of_xla(bits, stochastic):
  key = jax.random.key(7) if stochastic else None
  xla, kernel = _both(_range_quantize(bits, key), _x())
  _assert_same(kernel, xla)
  assert len(np.unique(kernel)) <= 2**bits


@needs_kernels
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("widths", [None, (3, 4, 6)])
def test_per_sample_widths_match_xla_and_width_zero_passes_through(stochastic, widths):
  key = jax.random.key(3) if stochastic else None
  bits = jnp.asarray([0, 4, 6] if widths is None else [3, 4, 6], jnp.int32)
  x = _x(1)
  xla, kernel = _both(lambda x, b: _range_quantize(None, key, widths)(x, b), x, bits)
  _assert_same(kernel, xla)
  if widths is None:
    np.testing.assert_array_equal(kernel[0], x[0])


@needs_kernels
def test_the_noise_differs_by_key_and_stays_unbiased():
  """Stochastic rounding on the kernel: E[Q(x)] = x (SPEC section 1), new noise per key."""
  x = _x(2, (4, 64, 64, 4), 1.0)
  f = _range_quantize(2, jax.random.key(0))
  _, a = _both(f, x)
  _, b = _both(_range_quantize(2, jax.random.key(1)), x)
  assert float(jnp.mean(a != b)) > 0.2
  step = float((jnp.max(x) - jnp.min(x)) / 3)
  draws = jnp.stack([_both(_range_quantize(2, jax.random.key(k)), x)[1] for k in range(16)])
  bias = jnp.mean(draws - x)  # 65,536 x 16 draws: the mean error's sd is about 4e-4 * step.
  assert abs(float(bias)) < 0.01 * step


@needs_kernels
def test_the_blend_backward_matches_a_float64_sum():
  widths = (3, 4, 4, 6, 8)
  x, g = _x(3), _x(4, scale=1.0)
  mask = jax.nn.one_hot(jnp.asarray([1, 4, 0]), len(widths))

  def vjp(x, mask):
    f = lambda x, m: quant.fake_quant_blend(x, m, widths, lo=jnp.min(x), hi=jnp.max(x),
                                            one_hot=True)
    return jax.vjp(f, x, mask)[1](g)

  (dx_xla, _), (dx, dmask) = _both(vjp, x, mask)
  np.testing.assert_array_equal(dx, dx_xla)  # g times each sample's mask sum (1).
  lo, hi = jnp.min(x), jnp.max(x)
  g64 = np.asarray(g, np.float64).reshape(len(g), -1)
  for k, w in enumerate(widths):
    q = np.asarray(jax.jit(lambda x: quant.quantize(x, w, lo=lo, hi=hi))(x), np.float64)
    expected = np.sum(g64 * q.reshape(len(q), -1), axis=1)
    scale = np.sum(np.abs(g64 * q.reshape(len(q), -1)), axis=1)
    np.testing.assert_array_less(np.abs(np.asarray(dmask[:, k], np.float64) - expected),
                                 1e-6 * scale)


@needs_kernels
def test_quant_routes_per_tensor_float32_ranges_only():
  x = _x(5, (2, 8, 8, 4))

  def calls(fn, *args):
    with kernels.use(kernels.ONEDNN):
      return str(jax.make_jaxpr(fn)(*args))

  assert library.QUANTIZE in calls(_range_quantize(4), x)
  assert library.QUANTIZE in calls(jax.grad(
      lambda x: jnp.sum(quant.quantize_grad(x, 8, jax.random.key(0)) ** 2)), x)
  # Per-channel weight ranges and bfloat16 stay XLA's, and so does everything outside a
  # step on the oneDNN kernels.
  assert library.QUANTIZE not in calls(lambda w: quant.quantize_weight(w, 4), x)
  assert library.QUANTIZE not in calls(_range_quantize(4), x.astype(jnp.bfloat16))
  assert library.QUANTIZE not in str(jax.make_jaxpr(_range_quantize(4))(x))


@needs_kernels
def test_gradient_quantization_on_the_kernel_equals_xla_through_a_vjp():
  """``quantize_grad``'s backward (static and per-sample widths) through jax.grad."""
  x = _x(6, (3, 40, 40, 8))
  key = jax.random.key(11)

  def loss(x, bits):
    y = quant.quantize_grad(x, bits, key, widths=None if isinstance(bits, int) else (2, 4, 8))
    return jnp.sum(jnp.sin(y))

  for bits in (8, jnp.asarray([2, 8, 4], jnp.int32)):
    xla, kernel = _both(jax.grad(lambda x: loss(x, bits)), x)
    _assert_same(kernel, xla)
