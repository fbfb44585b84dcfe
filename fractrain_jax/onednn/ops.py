"""The FFI kernels as JAX functions: oneDNN's conv (``conv.cc``'s three passes) and
training BatchNorm (``batch_norm.cc``'s two), each under a ``custom_vjp``, and the
quantizer's one-pass kernels (``quantize.cc``: the quantization, DFQ's blend backward).

``supports`` says which ``jax.lax.conv_general_dilated`` calls it takes (2-D, float32,
NHWC/HWIO/NHWC, no input dilation, no batch groups, no negative padding); the rest stay
XLA's (``fractrain_jax/conv.py`` routes). The window (strides, padding, dilation,
groups) is static, so it travels as a hashable tuple and reaches the kernels as one
FFI attribute.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fractrain_jax.onednn import library

_LAYOUT = ("NHWC", "HWIO", "NHWC")


def _canonical(lhs_shape, rhs_shape) -> jax.lax.ConvDimensionNumbers:
  return jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, _LAYOUT)


def window(lhs_shape, rhs_shape, options: Mapping[str, Any]) -> tuple[int, ...] | None:
  """The kernels' window attribute for a conv with ``options`` (``conv_general_dilated``'s
  keyword arguments), or None where the kernels do not take that conv."""
  if len(lhs_shape) != 4 or len(rhs_shape) != 4:
    return None
  if jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, options.get("dimension_numbers")) \
      != _canonical(lhs_shape, rhs_shape):
    return None
  if any(d != 1 for d in options.get("lhs_dilation") or (1, 1)):
    return None
  if options.get("batch_group_count", 1) != 1:
    return None
  if options.get("preferred_element_type") not in (None, jnp.float32, np.float32):
    return None
  strides = tuple(options.get("window_strides") or (1, 1))
  dilation = tuple(options.get("rhs_dilation") or (1, 1))
  padding = options.get("padding", "VALID")
  if isinstance(padding, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(rhs_shape[:2], dilation)]
    padding = jax.lax.padtype_to_pads(lhs_shape[1:3], dilated, strides, padding)
  (lo_h, hi_h), (lo_w, hi_w) = padding
  if min(lo_h, hi_h, lo_w, hi_w) < 0:
    return None
  groups = options.get("feature_group_count", 1)
  return (*strides, lo_h, lo_w, hi_h, hi_w, *dilation, groups)


def supports(lhs: jax.Array, rhs: jax.Array, options: Mapping[str, Any]) -> bool:
  return (lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
          and window(lhs.shape, rhs.shape, options) is not None)


def _out_shape(lhs, rhs, win) -> jax.ShapeDtypeStruct:
  sh, sw, lo_h, lo_w, hi_h, hi_w, dh, dw, groups = win
  return jax.eval_shape(
      lambda x, k: jax.lax.conv_general_dilated(
          x, k, (sh, sw), ((lo_h, hi_h), (lo_w, hi_w)), rhs_dilation=(dh, dw),
          dimension_numbers=_LAYOUT, feature_group_count=groups), lhs, rhs)


def _call(target: str, out, *operands, **attributes):
  """One FFI call of ``target`` with result shape(s) ``out``."""
  # "sequential": a vmapped op (none in this project) stays correct, one call per element.
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*operands, **attributes)


def _like(x: jax.Array) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(lhs: jax.Array, rhs: jax.Array, win: tuple[int, ...]) -> jax.Array:
  """``lhs`` [N, H, W, C] conv ``rhs`` [KH, KW, C / groups, O] with window ``win``
  (``window()``), in float32 through oneDNN."""
  return _forward(lhs, rhs, win)[0]


def _forward(lhs, rhs, win):
  library.require()
  window_ = np.asarray(win, np.int64)
  return _call(library.FORWARD, _out_shape(lhs, rhs, win), lhs, rhs, window=window_), (lhs, rhs)


def _backward(win, residuals, g):
  lhs, rhs = residuals
  window_ = np.asarray(win, np.int64)
  d_lhs = _call(library.INPUT_GRAD, _like(lhs), g, rhs, window=window_)
  d_rhs = _call(library.WEIGHT_GRAD, _like(rhs), lhs, g, window=window_)
  return d_lhs, d_rhs


conv.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(x: jax.Array, scale: jax.Array, shift: jax.Array, epsilon: float,
               relu: bool = False):
  """(y, mean, var): float32 ``x`` [N, H, W, C] normalized over N, H and W by the batch's
  mean and biased variance (``epsilon`` added), times ``scale`` plus ``shift``.

  relu: y is ReLU of that, in the same kernel; its forward pass also writes the ReLU's
  mask (a byte an element), which the backward pass reads, so the ReLU and its
  gradient are no passes over memory of their own.

  Only y is differentiated: mean and var feed the running averages, under
  ``stop_gradient`` (``norm.BatchNorm``), so their cotangents are zero.
  """
  return _bn_forward(x, scale, shift, epsilon, relu)[0]


def _bn_results(x, scale):
  """y (or dx) and two per-channel vectors: mean and var (or the gradients of scale and
  shift)."""
  return _like(x), _like(scale), _like(scale)


def _bn_forward(x, scale, shift, epsilon, relu):
  library.require()
  if relu:
    y, mean, var, mask = _call(
        library.BN_RELU_FORWARD, (*_bn_results(x, scale), jax.ShapeDtypeStruct(x.shape, jnp.uint8)),
        x, scale, shift, epsilon=np.float32(epsilon))
  else:
    (y, mean, var), mask = _call(library.BN_FORWARD, _bn_results(x, scale), x, scale, shift,
                                 epsilon=np.float32(epsilon)), None
  return (y, mean, var), (x, scale, mean, var, mask)


def _bn_backward(epsilon, relu, residuals, cotangents):
  x, scale, mean, var, mask = residuals
  target, masks = (library.BN_RELU_BACKWARD, (mask,)) if relu else (library.BN_BACKWARD, ())
  return tuple(_call(target, _bn_results(x, scale), cotangents[0], x, scale, mean, var, *masks,
                     epsilon=np.float32(epsilon)))


batch_norm.defvjp(_bn_forward, _bn_backward)


def quantize(x: jax.Array, lo: jax.Array, step: jax.Array, inv_step: jax.Array,
             top: jax.Array, bits: jax.Array, seed: jax.Array, *, stochastic: bool,
             passthrough: bool) -> jax.Array:
  """``quant.quantize`` of float32 ``x`` in one pass (``quantize.cc``): ``bits`` [P] splits
  ``x`` into P equal runs of consecutive elements (P = 1, or a sample or token each),
  each with its grid's ``step``, ``inv_step`` and ``top`` [P] over the per-tensor ``lo``.

  stochastic: add ``quant.uniform_noise`` from ``seed`` (the key's mixed bits);
  passthrough: a run at width 0 stays ``x``. Not differentiable: FracTrain's quantizers
  are straight-through, so only their values are needed.
  """
  library.require()
  return _call(library.QUANTIZE, _like(x), x, lo, step, inv_step, top, bits,
               jnp.asarray(seed, jnp.uint32), stochastic=np.int32(stochastic),
               passthrough=np.int32(passthrough))


def blend_grad(x: jax.Array, g: jax.Array, scale: jax.Array, lo: jax.Array,
               step: jax.Array, inv_step: jax.Array, top: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """DFQ's blend backward in one pass over float32 ``x`` and ``g`` (``quantize.cc``):
  ``dx = g * scale[run]`` and ``dots[run, k] = <g, Q_k(x)>`` over each of the
  ``scale.size`` runs, for K grids given by ``step``, ``inv_step`` and ``top`` [K]."""
  library.require()
  runs = scale.size
  return _call(library.BLEND_GRAD,
               (_like(x), jax.ShapeDtypeStruct((runs, step.size), jnp.float32)),
               x, g, scale.reshape(-1), lo, step, inv_step, top)
