"""Fake quantizers with separate forward and backward bit widths (SPEC section 1).

All quantizers are asymmetric min/max quantizers with ``2**b`` levels and
return the dequantized ("fake") value. A bit width is either a Python int
(static: changing it recompiles) or an integer array over the tensor's
leading axes (traced: changing it does not): shape ``(batch,)`` gives each
sample of a CNN's batch its own width, ``(batch, positions)`` each token of a
Transformer's sequences; the width broadcasts over the remaining axes.
Ranges stay per tensor either way. Width ``0`` means "do not quantize": the
tensor passes through bit for bit.
"""

from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from fractrain_jax import kernels
from fractrain_jax.onednn import ops as onednn_ops

Bits = Union[int, jax.Array, np.ndarray]

MAX_BITS = 32
# SPEC section 1: the step never drops below this, so a constant tensor stays finite.
MIN_STEP = 1e-8


def is_static(bits: Bits) -> bool:
  """True for a Python (or NumPy scalar) int width, False for an array of widths."""
  return isinstance(bits, (int, np.integer)) and not isinstance(bits, bool)


def check_bits(bits: Bits, what: str = "bits") -> None:
  """Refuses a width that is not an int in 0..32 (0 = do not quantize)."""
  if is_static(bits):
    if not 0 <= int(bits) <= MAX_BITS:
      raise ValueError(
          f"{what}={bits!r} is outside 0..{MAX_BITS} "
          "(use 1..32 bits, or 0 for no quantization)")
    return
  dtype = getattr(bits, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(
        f"{what}={bits!r} is not an integer bit width: pass a Python int in "
        f"0..{MAX_BITS} or an integer array over the leading axes, e.g. (batch,)")
  if getattr(bits, "ndim", 0) < 1:
    raise ValueError(
        f"{what} has shape {bits.shape}; an array of widths needs at least one axis "
        "((batch,) per sample, (batch, positions) per token)")
  if isinstance(bits, np.ndarray) and (bits.min() < 0 or bits.max() > MAX_BITS):
    raise ValueError(f"{what}={bits!r} has values outside 0..{MAX_BITS}")


def _over_leading(v: jax.Array, ndim: int) -> jax.Array:
  """Reshapes values over a tensor's leading axes to broadcast over its other axes."""
  return jnp.reshape(v, v.shape + (1,) * (ndim - v.ndim))


def _check_leading(what: str, shape: tuple[int, ...], x_shape: tuple[int, ...]) -> None:
  if len(shape) > len(x_shape) or tuple(x_shape[:len(shape)]) != tuple(shape):
    raise ValueError(f"{what} has shape {tuple(shape)}; expected the leading axes of the "
                     f"tensor's shape {tuple(x_shape)}")


def _mix32(h: jax.Array) -> jax.Array:
  """A 32-bit integer finalizer with full avalanche (lowbias32)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def uniform_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform(-0.5, 0.5) noise for stochastic rounding, one value per element.

  Counter-based: a hash of each element's flat index, seeded by 32 random bits
  from ``key``. It is element-wise, so XLA fuses it into the quantization, and
  it does not depend on how the tensor is sharded. ``jax.random.uniform`` costs
  about 5x a whole deterministic quantization on the CPU.
  """
  seed = _noise_seed(key)
  size = int(np.prod(shape, dtype=np.int64))
  if size >= 2**32:
    raise ValueError(f"tensor of {size} elements is too large for 32-bit noise counters")
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  h = _mix32(index ^ seed)
  # 24 bits fill a float32 mantissa exactly: u is in [-0.5, 0.5).
  return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24) - jnp.float32(0.5)


def _along_last_axis(s: jax.Array, x: jax.Array) -> jax.Array:
  """A scalar range term as a vector over ``x``'s last axis; other shapes unchanged.

  Why: with YNNPACK element-wise fusion on (the CPU flag the entry points
  set), XLA:CPU writes every scalar broadcast out as a whole tensor before a
  fused kernel reads it, but broadcasts a vector inside the kernel. The
  barrier keeps XLA from folding the vector back into a scalar broadcast.
  Measured with `python -m fractrain_jax.benchmark quant` (docs/RESULTS.md):
  a fully quantized conv went from 1.28-1.31x to 1.16-1.27x its FP32 time.
  On other backends it costs a vector broadcast per range term. Values are
  unchanged.
  """
  if x.ndim == 0 or s.ndim > 0:  # Per-channel or per-sample terms broadcast in-kernel already.
    return s
  return jax.lax.optimization_barrier(jnp.broadcast_to(s, x.shape[-1:]))


def grid(bits: Bits, lo: jax.Array, hi: jax.Array):
  """``(step, inv_step, top)`` of the ``2**bits``-level grid over ``[lo, hi]``.

  A static width gives scalars; an array of widths gives arrays of its shape
  (``lo`` and ``hi`` per-tensor), or of the broadcast of its shape with the
  range's. Both of ``quantize``'s paths use these terms, so they agree to the bit.
  """
  if is_static(bits):
    levels = jnp.float32(2.0**bits - 1)
  else:
    levels = jnp.exp2(bits.astype(jnp.float32)) - 1.0
  step = jnp.maximum((hi - lo) / levels, jnp.float32(MIN_STEP))
  # One division per range, not per element: XLA:CPU divides element-wise at
  # several times the cost of a multiply (measured 4.1 ms vs 2.4 ms on 2M floats).
  inv_step = 1.0 / step
  return step, inv_step, lo + levels * step


def _noise_seed(key: jax.Array) -> jax.Array:
  """The 32 bits that seed ``uniform_noise``'s hash."""
  return _mix32(jax.random.bits(key, (), jnp.uint32))


def _on_kernel(x: jax.Array, lo: jax.Array, hi: jax.Array) -> bool:
  """Whether this quantization runs the one-pass kernel: inside a step on the "onednn"
  kernels (``kernels.py``), for a float32 tensor with a per-tensor range."""
  return (kernels.current() == kernels.ONEDNN and x.dtype == jnp.float32 and x.ndim >= 1
          and lo.ndim == 0 and hi.ndim == 0)


def quantize(x: jax.Array, bits: Bits, *, lo, hi, key: jax.Array | None = None,
             widths: tuple[int, ...] | None = None) -> jax.Array:
  """Dequantized ``Q_b(x; lo, hi)``; rounds to nearest, or stochastically with ``key``.

  widths: the values an array of ``bits`` can take (DFQ's candidates), when
  known. Without 0 among them no sample passes through unquantized, and the
  pass-through select, a whole pass over the tensor, is left out; the values
  are the same.

  Inside a step on the "onednn" kernels, a float32 tensor with a per-tensor
  range is quantized by one kernel in one pass (``onednn/quantize.cc``), to
  the same bits; elsewhere by XLA's fusions.
  """
  check_bits(bits)
  if is_static(bits):
    if bits == 0:
      return x
  else:
    _check_leading("bits", bits.shape, x.shape)
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  passthrough = not is_static(bits) and (widths is None or 0 in widths)
  if _on_kernel(x, lo, hi):
    runs = jnp.asarray(bits, jnp.int32).reshape(-1)
    terms = (t.reshape(-1) for t in grid(bits, lo, hi))
    seed = jnp.uint32(0) if key is None else _noise_seed(key)
    return onednn_ops.quantize(x, lo, *terms, runs, seed, stochastic=key is not None,
                               passthrough=passthrough)
  xf = x.astype(jnp.float32)
  step, inv_step, top = grid(bits if is_static(bits) else _over_leading(bits, x.ndim), lo, hi)
  lo, step, inv_step, top = (_along_last_axis(t, x) for t in (lo, step, inv_step, top))
  v = (xf - lo) * inv_step
  if key is not None:
    v = v + uniform_noise(key, x.shape)
  # Clipping the dequantized value to [lo, lo + levels * step] equals clipping the
  # level to [0, levels], and keeps constant tensors out of the fused kernel.
  q = jnp.minimum(jnp.maximum(jnp.round(v) * step + lo, lo), top)
  if passthrough:
    q = jnp.where(_over_leading(bits, x.ndim) == 0, xf, q)
  return q.astype(x.dtype)


@jax.custom_vjp
def straight_through(x: jax.Array, y: jax.Array) -> jax.Array:
  """Returns ``y``; the cotangent goes to ``x`` unchanged and nothing to ``y``."""
  return y


def _straight_through_fwd(x, y):
  return y, None


def _straight_through_bwd(_, g):
  return g, None


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def fake_quant(x: jax.Array, bits: Bits, *, lo=None, hi=None) -> jax.Array:
  """Quantizes ``x`` in the forward pass; the backward pass is straight-through.

  Without ``lo``/``hi`` the range is the per-tensor min/max of ``x``.
  """
  check_bits(bits)
  if is_static(bits) and bits == 0:
    return x
  xs = jax.lax.stop_gradient(x)
  lo = jnp.min(xs) if lo is None else jax.lax.stop_gradient(lo)
  hi = jnp.max(xs) if hi is None else jax.lax.stop_gradient(hi)
  return straight_through(x, quantize(xs, bits, lo=lo, hi=hi))


def _candidate_widths(widths) -> tuple[int, ...]:
  """DFQ's candidate widths as a hashable tuple of checked ints (static under jit)."""
  widths = tuple(int(w) for w in widths)
  for w in widths:
    check_bits(w, "candidate bits")
  return widths


def fake_quant_blend(x: jax.Array, mask: jax.Array, widths: tuple[int, ...], *, lo,
                     hi, one_hot: bool = False) -> jax.Array:
  """``sum_k mask[..., k] * Q_{widths[k]}(x)``: DFQ's choice of input width.

  mask: ``x.shape[:m] + (K,)``, one choice per sample (``m = 1``, the CNNs)
  or per token (``m = 2``, the Transformer LM). All candidates share the
  range ``[lo, hi]``. Backward: straight-through in ``x``
  (``dx = g * sum_k mask[..., k]``) and ``d mask[n, k] = <g[n], Q_k(x[n])>``
  over the remaining axes (``n`` a sample or a token), the gate's learning
  signal. The candidate quantizations are recomputed in the backward pass
  rather than stored: K activation-sized tensors per conv would otherwise be
  written and read back.

  one_hot: promise that ``mask`` is exactly one-hot in the forward pass, as the
  gate's straight-through masks are. The forward value is then one per-sample
  quantization at each sample's chosen width, the same numbers as the sum over
  the candidates at the cost of one candidate (DFQ's ResNet-38 step went from
  1.54x to 1.40x FP32, docs/RESULTS.md). The gradients are unchanged.
  """
  widths = _candidate_widths(widths)
  if mask.ndim < 2 or mask.shape[-1] != len(widths):
    raise ValueError(f"mask has shape {mask.shape}; expected (batch, K) or "
                     f"(batch, positions, K) with K = {len(widths)} candidates")
  _check_leading("mask", mask.shape[:-1], x.shape)
  lo = jax.lax.stop_gradient(jnp.asarray(lo, jnp.float32))
  hi = jax.lax.stop_gradient(jnp.asarray(hi, jnp.float32))
  return _blend(x, mask, lo, hi, widths, bool(one_hot))


def _blend_terms(x, lo, hi, widths):
  """Q_w(x) once per distinct width: candidates often repeat one, e.g. (3, 4, 4, 6, 6)."""
  return {w: quantize(x, w, lo=lo, hi=hi) for w in sorted(set(widths))}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blend(x, mask, lo, hi, widths, one_hot):
  if one_hot:
    chosen = jnp.asarray(widths, jnp.int32)[jnp.argmax(mask, axis=-1)]
    return quantize(x, chosen, lo=lo, hi=hi, widths=widths)
  out = None
  for w, q in _blend_terms(x, lo, hi, widths).items():
    weight = sum(mask[..., k] for k, wk in enumerate(widths) if wk == w)
    term = _over_leading(weight.astype(x.dtype), x.ndim) * q
    out = term if out is None else out + term
  return out


def _blend_fwd(x, mask, lo, hi, widths, one_hot):
  return _blend(x, mask, lo, hi, widths, one_hot), (x, mask, lo, hi)


def _blend_bwd(widths, one_hot, res, g):
  del one_hot  # The same gradients either way.
  x, mask, lo, hi = res
  scale = jnp.sum(mask, axis=-1).astype(g.dtype)
  distinct = sorted(set(widths))
  if _on_kernel(x, lo, hi) and g.dtype == jnp.float32:
    # One pass over x and g for dx and every candidate's dot (onednn/quantize.cc).
    # Static widths' grids, as _blend_terms quantizes with.
    terms = (jnp.stack(t) for t in zip(*(grid(w, lo, hi) for w in distinct)))
    dx, dots = onednn_ops.blend_grad(x, g, scale, lo, *terms)
    dots = dots.reshape(scale.shape + (len(distinct),))
    dmask = jnp.stack([dots[..., distinct.index(w)] for w in widths], axis=-1)
    return dx, dmask.astype(mask.dtype), jnp.zeros_like(lo), jnp.zeros_like(hi)
  dx = g * _over_leading(scale, g.ndim)
  axes = tuple(range(mask.ndim - 1, x.ndim))
  dots = {w: jnp.sum(g * q, axis=axes) for w, q in _blend_terms(x, lo, hi, widths).items()}
  dmask = jnp.stack([dots[w] for w in widths], axis=-1).astype(mask.dtype)
  return dx, dmask, jnp.zeros_like(lo), jnp.zeros_like(hi)


_blend.defvjp(_blend_fwd, _blend_bwd)


def quantize_weight(w: jax.Array, bits: int, channel_axes: tuple[int, ...] | None = None
                    ) -> jax.Array:
  """Per-output-channel fake quantization, straight-through.

  channel_axes: the kernel's output-channel axes, each combination of which
  gets its own range; None is the last axis (a conv's HWIO, a dense (in,
  out) kernel). An einsum kernel may have several, anywhere.
  """
  check_bits(bits)
  if not is_static(bits):
    raise ValueError(f"weight bits must be a Python int, got {bits!r}")
  if bits == 0:
    return w
  ws = jax.lax.stop_gradient(w)
  last = (w.ndim - 1,)
  channels = last if channel_axes is None else tuple(sorted(a % w.ndim for a in channel_axes))
  axes = tuple(a for a in range(w.ndim) if a not in channels)
  # The last-axis case keeps its ranges as vectors (see _along_last_axis).
  keep = channels != last
  lo = jnp.min(ws, axis=axes, keepdims=keep)
  hi = jnp.max(ws, axis=axes, keepdims=keep)
  return straight_through(w, quantize(ws, bits, lo=lo, hi=hi))


def _quantize_cotangent(g: jax.Array, bits: Bits, key: jax.Array,
                        widths: tuple[int, ...] | None = None) -> jax.Array:
  return quantize(g, bits, lo=jnp.min(g), hi=jnp.max(g), key=key, widths=widths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantize_grad_static(y, key, bits):
  del key, bits
  return y


def _quantize_grad_static_fwd(y, key, bits):
  del bits
  return y, key


def _quantize_grad_static_bwd(bits, key, g):
  return _quantize_cotangent(g, bits, key), None


_quantize_grad_static.defvjp(_quantize_grad_static_fwd, _quantize_grad_static_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _quantize_grad_array(y, bits, key, widths):
  del bits, key, widths
  return y


def _quantize_grad_array_fwd(y, bits, key, widths):
  del widths
  return y, (bits, key)


def _quantize_grad_array_bwd(widths, res, g):
  bits, key = res
  return _quantize_cotangent(g, bits, key, widths), None, None


_quantize_grad_array.defvjp(_quantize_grad_array_fwd, _quantize_grad_array_bwd)


def quantize_grad(y: jax.Array, bits: Bits, key: jax.Array | None, *,
                  widths: tuple[int, ...] | None = None) -> jax.Array:
  """Identity forward; backward quantizes the cotangent of ``y`` stochastically.

  The cotangent's range is its own per-tensor min/max over the whole batch;
  an array of ``bits`` over the leading axes picks each sample's (or token's)
  grid within that range; ``widths``, the values it can take (see
  ``quantize``).
  """
  check_bits(bits)
  if is_static(bits):
    if bits == 0:
      return y
    if key is None:
      raise ValueError(f"quantize_grad at {bits} bits needs a PRNG key for stochastic rounding")
    return _quantize_grad_static(y, key, int(bits))
  if key is None:
    raise ValueError("quantize_grad with an array of bits needs a PRNG key")
  _check_leading("bits", bits.shape, y.shape)
  if widths is not None:
    widths = _candidate_widths(widths)
  return _quantize_grad_array(y, bits, key, widths)
