"""The convolution every quantized conv layer runs: oneDNN's kernels or XLA's, its weight
gradient split over the batch where XLA's is slow.

Kernel: inside a step on the "onednn" kernels (``kernels.py``, ``config.train.kernels``)
a conv that oneDNN's kernels take (``onednn.ops.supports``) runs there, 1.5-3x faster
per conv than XLA:CPU's own on this AVX-512 CPU (docs/RESULTS.md, "Fifth step").

Weight-gradient split (the convs that stay XLA's): XLA:CPU computes a conv's weight gradient as one convolution whose
window is the whole output image and whose contraction runs over the whole
batch. On a 2-core AVX-512 CPU, for a conv whose input has 16 features or
fewer, the sum of the weight gradients of chunks of 8 samples is the same
gradient, in another summation order, at 0.6-0.9x the time; from 32 features up
XLA's one conv is faster (docs/RESULTS.md, "Fourth step"). The input gradient
and the forward pass are XLA's own.

The split is read when a step is traced (``weight_grad_split``), so a model
called outside it (tests, a user's own loop) runs XLA's form, and a mesh of
several devices keeps it: chunks of a batch sharded over devices would cross
them. ``config.train.conv_weight_grad_split`` chooses: -1 (auto: chunks of
``CPU_SPLIT`` samples on a one-device CPU mesh for convs whose input has at
most ``CPU_SPLIT_MAX_FEATURES`` features, XLA's form elsewhere), 0 (XLA's form
always, the numerics of earlier versions bit for bit) or n > 0 samples (every
conv).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from fractrain_jax import kernels
from fractrain_jax.onednn import ops as onednn_ops

AUTO = -1
# Samples per chunk on the CPU: chunks of 8 and 16 tied at 16 features, chunks of
# 4 were slower (docs/RESULTS.md, "Fourth step").
CPU_SPLIT = 8
# Auto splits only convs whose input has at most this many features: with 32 or
# 64 XLA's one weight-gradient conv measured 0.4-0.9x the split's time on this CPU,
# with 3 or 16 the split 0.6-0.9x XLA's (docs/RESULTS.md, "Fourth step").
CPU_SPLIT_MAX_FEATURES = 16


class Split(NamedTuple):
  """Which convs of a step compute their weight gradient in chunks, and how big."""
  samples: int  # Samples per chunk; 0: XLA's one conv over the whole batch.
  max_features: int | None = None  # Only convs whose input has at most this many; None: all.


_SPLIT: contextvars.ContextVar[Split] = contextvars.ContextVar("fractrain_weight_grad_split",
                                                               default=Split(0))


def check_split(split: int) -> int:
  """Refuses a setting other than -1 (auto), 0 (XLA's form) or a positive sample count."""
  if isinstance(split, bool) or not isinstance(split, (int, np.integer)) or split < AUTO:
    raise ValueError(f"train.conv_weight_grad_split={split!r}; expected -1 (auto), 0 (XLA's "
                     "weight-gradient conv over the whole batch) or a number of samples >= 1")
  return int(split)


def resolve_split(split: int, mesh: jax.sharding.Mesh) -> Split:
  """The split a step on ``mesh`` uses for setting ``split`` (see the module doc)."""
  split = check_split(split)
  if mesh.devices.size > 1:
    return Split(0)
  if split == AUTO:
    if mesh.devices.flat[0].platform == "cpu":
      return Split(CPU_SPLIT, CPU_SPLIT_MAX_FEATURES)
    return Split(0)
  return Split(split)


@contextlib.contextmanager
def weight_grad_split(split: Split | int) -> Iterator[None]:
  """Convs traced inside compute their weight gradient as ``split`` says; an int n is
  ``Split(n)``: chunks of n samples for every conv (0 = XLA's one conv)."""
  if not isinstance(split, Split):
    split = Split(split)
  token = _SPLIT.set(Split(check_split(split.samples), split.max_features))
  try:
    yield
  finally:
    _SPLIT.reset(token)


def _freeze(v: Any) -> Any:
  """Lists (padding pairs) as tuples, so the options are hashable; a namedtuple (Flax's
  ``ConvDimensionNumbers``) as it is."""
  if isinstance(v, list) or (isinstance(v, tuple) and not hasattr(v, "_fields")):
    return tuple(_freeze(e) for e in v)
  return v


# jax.lax.conv_general_dilated's arguments after lhs and rhs, in order.
_OPTIONS = ("window_strides", "padding", "lhs_dilation", "rhs_dilation", "dimension_numbers",
            "feature_group_count", "batch_group_count", "precision", "preferred_element_type")


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
  """``jax.lax.conv_general_dilated`` (same arguments) on the kernel a step asks for, its
  weight gradient split if asked."""
  options = dict(zip(_OPTIONS, args)) | kwargs
  if kernels.current() == kernels.ONEDNN and onednn_ops.supports(lhs, rhs, options):
    return onednn_ops.conv(lhs, rhs, onednn_ops.window(lhs.shape, rhs.shape, options))
  samples, max_features = _SPLIT.get()
  spec = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, options.get("dimension_numbers"))
  batch, features = lhs.shape[spec.lhs_spec[0]], lhs.shape[spec.lhs_spec[1]]
  if (samples <= 0 or batch <= samples or options.get("batch_group_count", 1) != 1
      or (max_features is not None and features > max_features)):
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
  frozen = tuple(sorted((k, _freeze(v)) for k, v in options.items()))
  return _split_conv(lhs, rhs, frozen, samples)


def _conv(lhs, rhs, frozen):
  return jax.lax.conv_general_dilated(lhs, rhs, **dict(frozen))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _split_conv(lhs, rhs, frozen, samples):
  del samples
  return _conv(lhs, rhs, frozen)


def _split_conv_fwd(lhs, rhs, frozen, samples):
  del samples
  return _conv(lhs, rhs, frozen), (lhs, rhs)


def _split_conv_bwd(frozen, samples, res, g):
  lhs, rhs = res
  spec = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dict(frozen).get("dimension_numbers"))
  in_axis, out_axis = spec.lhs_spec[0], spec.out_spec[0]
  (d_lhs,) = jax.vjp(lambda x: _conv(x, rhs, frozen), lhs)[1](g)
  d_rhs = None
  for start in range(0, lhs.shape[in_axis], samples):
    x = jax.lax.slice_in_dim(lhs, start, min(start + samples, lhs.shape[in_axis]), axis=in_axis)
    gi = jax.lax.slice_in_dim(g, start, min(start + samples, g.shape[out_axis]), axis=out_axis)
    (part,) = jax.vjp(lambda k, x=x: _conv(x, k, frozen), rhs)[1](gi)
    d_rhs = part if d_rhs is None else d_rhs + part
  return d_lhs, d_rhs


_split_conv.defvjp(_split_conv_fwd, _split_conv_bwd)
