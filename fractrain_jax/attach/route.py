"""How one forward pass of an attached model hands each layer its precision.

The user's forward pass calls its layers and blocks as it always did, with
no precision argument. The attached model's call sets a ``Route`` for the
duration of that pass (``routing``); each attached layer asks it for its
precision and rounding key (``precision``), and each gated block announces
itself before it runs (``block``), which is where a gated route runs the
gate and holds the block's ``GatedBits`` while the block runs. Python state
read at trace time only: nothing here is traced, so the step compiles to
what a model written with the precisions as arguments would.

- ``Route``: one static precision (fp32, static bits, a PFQ stage);
- ``GatedRoute``: DFQ's per-sample or per-token choice per gated block;
- ``Discovery``: full precision, recording which layers and blocks a pass
  calls, in order, with their input shapes (``attach`` reads the model).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from fractrain_jax.attach.rules import FIXED, FULL, QUANTIZED, LayerPlan
from fractrain_jax.layers import LayerBits, StaticBits
from fractrain_jax.models.gated import forced_mask

_ROUTE: contextvars.ContextVar["Route | None"] = contextvars.ContextVar(
    "fractrain_route", default=None)


def current() -> "Route | None":
  return _ROUTE.get()


@contextlib.contextmanager
def routing(route: "Route") -> Iterator["Route"]:
  token = _ROUTE.set(route)
  try:
    yield route
  finally:
    _ROUTE.reset(token)


def fold_by_call(key: jax.Array, path: str, call: int) -> jax.Array:
  """The default rounding key of a layer call: the pass's key folded with the call's index."""
  del path
  return jax.random.fold_in(key, call)


LayerKey = Callable[[jax.Array, str, int], jax.Array]


class Route:
  """The precisions of one forward pass: ``static`` for every quantized layer.

  full: every layer at full precision, held ones too (FP32, fine-tuning).
  key: the pass's rounding key; ``layer_key(key, path, call)`` gives each
    layer call its own.
  """

  def __init__(self, *, static: StaticBits | None = None, full: bool = False,
               key: jax.Array | None = None, layer_key: LayerKey = fold_by_call):
    self.static = None if full else static
    self.full = full
    self.key = key
    self.layer_key = layer_key
    self.calls = 0

  def precision(self, plan: LayerPlan) -> tuple[LayerBits, jax.Array | None]:
    """The precision and rounding key of the next layer call, the layer's plan given."""
    call, self.calls = self.calls, self.calls + 1
    bits = self._bits(plan)
    if bits is None or self.key is None:
      return bits, None
    return bits, self.layer_key(self.key, plan.path, call)

  def _bits(self, plan: LayerPlan) -> LayerBits:
    if self.full or plan.action == FULL:
      return None
    if plan.action == FIXED:
      return plan.bits
    return self.static

  def called(self, plan: LayerPlan, inputs: jax.Array) -> None:
    """A layer ran (``Discovery`` records it)."""

  @contextlib.contextmanager
  def block(self, path: str, x: jax.Array) -> Iterator[None]:
    """A gated block is about to run on ``x`` (plain passes run it as any module)."""
    yield


class GatedRoute(Route):
  """DFQ's pass: before each gated block, the gate picks a candidate per sample (or token).

  model: the ``GatedAttachedModel`` (its gate, candidates and block order).
  Layers of a gated block take ``GatedBits`` with the block's mask while it
  runs; quantized layers outside every gated block stay full precision and
  held ones keep their bits, as the project's gated models keep their stem.
  """

  def __init__(self, model: Any, *, key: jax.Array | None, tau, force: int | None,
               full: bool):
    noise_key, round_key = (None, None) if key is None else jax.random.split(key)
    super().__init__(full=full, key=round_key, layer_key=model.layer_key)
    self.model = model
    self.noise_key = noise_key
    self.tau = tau
    self.force = force
    self.masks: list[jax.Array] = []
    self.state = None
    self.active: dict[int, LayerBits] = {}

  def _bits(self, plan: LayerPlan) -> LayerBits:
    if plan.block < 0 or self.full or plan.action != QUANTIZED:
      return super()._bits(plan)  # Route.static is None: quantized layers outside blocks are FP.
    if plan.block not in self.active:
      raise ValueError(f"layer {plan.path} belongs to gated block "
                       f"{self.model.block_paths[plan.block]} but ran outside its call")
    return self.active[plan.block]

  @contextlib.contextmanager
  def block(self, path: str, x: jax.Array) -> Iterator[None]:
    index = len(self.masks)
    paths = self.model.block_paths
    if index >= len(paths) or paths[index] != path:
      expected = paths[index] if index < len(paths) else "no further block"
      raise ValueError(f"gated block {path} ran where {expected} was expected: the gated "
                       f"blocks must run once each per forward pass, in the order {paths}")
    lead = tuple(x.shape[:2] if self.model.per_token else x.shape[:1])
    if self.force is not None:
      mask = forced_mask(self.force, self.model.num_candidates, lead)
    else:
      if self.state is None:
        self.state = self.model.gate.initial_state(lead)
      key = None if self.noise_key is None else jax.random.fold_in(self.noise_key, index)
      mask, self.state = self.model.gate(index, x, self.state, key=key, tau=self.tau)
    self.masks.append(mask)
    self.active[index] = self.model.block_bits(mask)
    try:
      yield
    finally:
      del self.active[index]

  def stacked_masks(self) -> jax.Array:
    """``(num_blocks, batch, K)`` or ``(num_blocks, batch, positions, K)``, every block having run."""
    missing = self.model.block_paths[len(self.masks):]
    if missing:
      raise ValueError(f"gated blocks {', '.join(missing)} did not run in this forward pass")
    return jnp.stack(self.masks)


class Discovery(Route):
  """A full-precision pass that records the layers and gated blocks it calls, in order."""

  def __init__(self):
    super().__init__(full=True)
    self.layers: list[tuple[str, tuple[int, ...]]] = []
    self.blocks: list[tuple[str, tuple[int, ...], Any]] = []
    # (what, path, a scalar of its input), read once the pass is over: a layer or
    # block run inside a JAX transform (nnx.vmap, nnx.scan, jax.lax loops) leaves a
    # tracer of that transform, which cannot be used outside it.
    self.probes: list[tuple[str, str, jax.Array]] = []

  def _probe(self, what: str, path: str, x: Any) -> None:
    if hasattr(x, "shape"):
      self.probes.append((what, path, jnp.asarray(x[(0,) * x.ndim], jnp.float32) * 0))

  def called(self, plan: LayerPlan, inputs: jax.Array) -> None:
    self.layers.append((plan.path, tuple(inputs.shape)))
    self._probe("layer", plan.path, inputs)

  @contextlib.contextmanager
  def block(self, path: str, x: jax.Array) -> Iterator[None]:
    self.blocks.append((path, tuple(getattr(x, "shape", ())), getattr(x, "dtype", None)))
    self._probe("gated block", path, x)
    yield

  def inside_transforms(self) -> list[str]:
    """``"layer PATH"`` / ``"gated block PATH"`` for each that ran inside a JAX transform;
    call it inside the trace that ran the pass."""
    inside = []
    for what, path, probe in self.probes:
      try:
        probe + 0  # pylint: disable=pointless-statement
      except jax.errors.UnexpectedTracerError:
        inside.append(f"{what} {path}")
    return inside
