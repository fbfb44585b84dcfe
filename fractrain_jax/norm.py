"""The BatchNorm of the zoo's conv blocks: Flax's, on oneDNN's kernels where a step asks.

``BatchNorm`` is ``nnx.BatchNorm`` (same variables, same checkpoints, same running
averages); in training on the "onednn" kernels (``kernels.py``) a float32 NHWC input
is normalized by ``onednn.ops.batch_norm`` with the batch's biased variance, as Flax's
two-pass form (``use_fast_variance=False``) computes it, and a ReLU that follows
(``relu=True``) runs in the same kernel. Anything else (evaluation,
other axes or dtypes, a mask, statistics synced over devices) is Flax's own call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fractrain_jax import kernels
from fractrain_jax.onednn import ops as onednn_ops


class BatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` whose training call runs oneDNN's kernels inside a oneDNN step."""

  def _onednn_takes(self, x: jax.Array, mask) -> bool:
    axis = self.axis if isinstance(self.axis, int) else tuple(self.axis)
    return (kernels.current() == kernels.ONEDNN and mask is None and x.ndim == 4
            and axis in (-1, 3, (-1,), (3,)) and self.axis_name is None
            and x.dtype == jnp.float32 and self.dtype in (None, jnp.float32)
            and self.scale is not None and self.bias is not None
            and self.scale.dtype == jnp.float32 and self.bias.dtype == jnp.float32)

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None,
               relu: bool = False):
    """relu: return ``ReLU(BN(x))``, in oneDNN's BatchNorm kernel where it runs."""
    running = self.use_running_average if use_running_average is None else use_running_average
    if running is None or running or not self._onednn_takes(x, mask):
      y = super().__call__(x, use_running_average, mask=mask)
      return jax.nn.relu(y) if relu else y
    y, mean, var = onednn_ops.batch_norm(x, self.scale[...], self.bias[...], self.epsilon, relu)
    # As Flax updates them: the statistics are not differentiated through.
    self.mean[...] = jax.lax.stop_gradient(self.momentum * self.mean[...]
                                           + (1 - self.momentum) * mean)
    self.var[...] = jax.lax.stop_gradient(self.momentum * self.var[...]
                                          + (1 - self.momentum) * var)
    return y
