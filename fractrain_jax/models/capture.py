"""Cost accounting by capture: a model's ``cost.LayerMACs`` from one abstract forward pass.

Every ``QuantizedLayer`` (``QConv``, ``QDense``) and ``Dense`` knows its role and, while costs are recorded,
sows its forward MACs per sample (``layers.record_cost``). ``capture_layer_macs``
runs a forward pass under ``nnx.capture`` inside ``jax.eval_shape`` (shapes
only, nothing computed) and turns the records into cost-table rows (SPEC
section 2), so a model never lists its layers for the accounting: any module
built from these layers gets its table from its own forward pass.

The pass runs on a throwaway copy of the model merged inside the trace, so
neither the captured records nor the capture's bookkeeping ever reach the
model's state (its train-time ``nnx.split`` or checkpoints).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fractrain_jax import cost
from fractrain_jax.layers import (ATTENTION, BRANCH, CLASSIFIER, DEPTHWISE, OUTER, SHORTCUT,
                                  CostRecord, recording_costs)
from fractrain_jax.models.parts import DEPTHWISE_BITS

# Cost kind of each role (cost.LayerMACs.kind) in the plain models, and in the gated
# ones for the roles their gate does not set.
PLAIN_KINDS = {OUTER: "static", BRANCH: "static", SHORTCUT: "static", DEPTHWISE: "fixed",
               CLASSIFIER: "fp", ATTENTION: "fp"}
GATED_KINDS = {OUTER: "fp", BRANCH: "fp", SHORTCUT: "fp", DEPTHWISE: "fixed",
               CLASSIFIER: "fp", ATTENTION: "fp"}

Path = tuple[Any, ...]


def path_name(path: Path) -> str:
  """``("blocks", 3, "conv1")`` -> ``"blocks.3.conv1"``."""
  return ".".join(str(p) for p in path)


def block_index(path: Path) -> int:
  """The ``l`` of a layer under ``blocks.<l>``; -1 outside the blocks."""
  for i in range(len(path) - 1):
    if path[i] == "blocks" and isinstance(path[i + 1], int):
      return path[i + 1]
  return -1


def capture_records(module: nnx.Module, forward: Callable[[nnx.Module, jax.Array], Any],
                    input_shape: Sequence[int], input_dtype: Any = jnp.float32
                    ) -> list[tuple[Path, int, str]]:
  """``(path, MACs per sample, role)`` of every layer call of ``forward(module, x)``, in order.

  path: the calling layer's path inside ``module``. ``x`` is a placeholder of
  ``input_shape`` and ``input_dtype`` (int32 for token ids); ``module`` may be abstract (``nnx.eval_shape``).
  """
  graphdef, state = nnx.split(module)
  captured = []

  def run(state):
    copy = nnx.merge(graphdef, state)  # Lives and dies inside this trace.
    x = jnp.zeros(tuple(input_shape), input_dtype)
    with recording_costs():
      _, records = nnx.capture(forward, CostRecord)(copy, x)
    captured.append(records)  # Python ints and strings only: safe to take out of the trace.

  jax.eval_shape(run, state)
  calls = []
  for path, variable in nnx.to_flat_state(captured[0]):
    for index, macs, role in variable.get_value():
      calls.append((index, tuple(path[:-1]), macs, role))  # path[-1] is the sow name.
  calls.sort(key=lambda call: call[0])
  return [(path, macs, role) for _, path, macs, role in calls]


def capture_layer_macs(module: nnx.Module, forward: Callable[[nnx.Module, jax.Array], Any],
                       input_shape: Sequence[int], *, gated: Sequence[str] = (),
                       name: Callable[[Path], str] = path_name,
                       block: Callable[[Path], int] = block_index,
                       input_dtype: Any = jnp.float32) -> list[cost.LayerMACs]:
  """The cost table of ``forward(module, x)``: one row per layer call, in call order.

  gated: the roles a gate sets; empty for a plain model. Otherwise the layers
    are labelled as a gated model runs them: those roles "gated" with the
    index of the gated block they belong to (``block``), depthwise convs
    "fixed", every other layer "fp".
  name: a layer's row name from its path.
  block: a layer's gated-block index from its path, -1 outside any; by
    default ``l`` of ``blocks.<l>`` (the Transformer LM's sublayers have their own).
  """
  kinds = {**GATED_KINDS, **{role: "gated" for role in gated}} if gated else PLAIN_KINDS
  fixed = (DEPTHWISE_BITS.a, DEPTHWISE_BITS.g, DEPTHWISE_BITS.w)
  layers = []
  for path, macs, role in capture_records(module, forward, input_shape, input_dtype):
    kind = kinds[role]
    index = block(path) if kind == "gated" else -1
    if kind == "gated" and index < 0:
      raise ValueError(f"{path_name(path)} is a {role} layer outside every gated block: "
                       "none to charge it to")
    layers.append(cost.LayerMACs(name(path), macs, kind, block=index,
                                 fixed=fixed if kind == "fixed" else None))
  return layers
