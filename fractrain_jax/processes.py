"""Several processes (JAX's multi-controller runtime): who writes, what each feeds, agreement.

A run of N processes (one per host, or per GPU) trains one model: every
process runs the same loop on its devices and takes part in the collectives
of each step and in Orbax's checkpoint saves and restores. What differs:

- ``is_writer()``: only process 0 writes the workdir's files (metrics.jsonl,
  log.txt, config.json, summary.json, TensorBoard, the lock) and prints the
  console progress; every process writes its own shards of a checkpoint.
- ``local_rows`` / ``global_batch``: a batch is split by rows over the
  processes; each feeds the rows of its own devices and the global array is
  assembled with ``jax.make_array_from_process_local_data`` (one process:
  the whole batch, as before).
- ``agree_any``: a decision every process must take at the same step
  becomes the same on all; ``gather_ints`` gives every process each one's
  value (which signal reached which process); ``barrier`` waits for all.
  All are no-ops with one process.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def count() -> int:
  return jax.process_count()


def index() -> int:
  return jax.process_index()


def is_writer() -> bool:
  """True in the one process that writes the workdir's files (process 0)."""
  return jax.process_index() == 0


def local_rows(global_size: int) -> slice:
  """The rows of a global batch of ``global_size`` that this process feeds."""
  n = jax.process_count()
  if global_size % n:
    raise ValueError(f"a batch of {global_size} does not split over {n} processes")
  share = global_size // n
  return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def global_batch(sharding: jax.sharding.Sharding, tree: Any, *, local: bool = False) -> Any:
  """The global arrays of a batch split by rows over ``sharding``.

  tree: NumPy arrays, each either the whole global batch (``local=False``: this
  process keeps its rows) or already this process's rows (``local=True``, a
  stream that decoded only them).
  """
  def one(x):
    x = np.asarray(x)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    rows = x if local else x[local_rows(x.shape[0])]
    shape = (rows.shape[0] * jax.process_count(),) + rows.shape[1:]
    return jax.make_array_from_process_local_data(sharding, rows, shape)

  return jax.tree.map(one, tree)


def gather_ints(value: int) -> list[int]:
  """``value`` of every process, in process order (a collective)."""
  if jax.process_count() == 1:
    return [int(value)]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value))).ravel()]


def agree_any(flag: bool) -> bool:
  """True on every process when ``flag`` is True on any of them (a collective)."""
  return any(gather_ints(bool(flag)))


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier called ``name``."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices(name)
