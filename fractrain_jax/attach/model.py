"""``attach``: FracTrain on a user's NNX model, without changing its code; ``detach`` undoes it.

``attach(model, sample, rules=..., blocks=...)`` clones the model's graph
with ``nnx.recursive_map`` (the clone shares every Variable with the
original), turns each ``nnx.Conv`` / ``nnx.Linear`` / ``nnx.Einsum`` into its
attached form (``layers.py``) and each module a ``blocks`` pattern names into
a gated block (``blocks.py``), then runs one abstract forward pass on
``sample`` (``route.Discovery``) to learn the order in which layers and
blocks run and what each block reads. The rules (``rules.py``) then decide
every layer's precision.

The result wraps the clone as ``.model``, whose parameter tree (paths,
shapes, values; the very Variables) is the user's, with the interface the
project's trainer, cost accounting and benchmark use for its own models:

- ``AttachedModel(x, bits=None, *, key=None) -> logits``: FP32, or every
  quantized layer at ``bits = (b_a, b_g)`` (weights at ``b_a``): SBM and PFQ;
- ``GatedAttachedModel(x, *, key, tau, force, full_precision) -> (logits,
  masks)``: DFQ and FracTrain, one decision per gated block and sample (or
  token), from one LSTM gate whose state is carried from block to block.

Both have ``task``, ``num_blocks``, ``layer_macs()`` (the cost table from
one abstract pass) and ``describe()`` (the table of layers and precisions).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fractrain_jax import cost
from fractrain_jax.attach import blocks as gated_blocks
from fractrain_jax.attach import rules as path_rules
from fractrain_jax.attach.layers import (AttachedLayer, attach_layer, base_class, detach_layer,
                                         is_attachable, swap_class)
from fractrain_jax.attach.route import Discovery, GatedRoute, LayerKey, Route, fold_by_call, routing
from fractrain_jax.attach.rules import FIXED, FULL, QUANTIZED, LayerPlan, Rule
from fractrain_jax.errors import ConfigError, UserError, one_line
from fractrain_jax.layers import StaticBits
from fractrain_jax.models.capture import capture_records
from fractrain_jax.models.gate import Gate
from fractrain_jax.models.gated import DEFAULT_CANDIDATES, Candidates, check_candidates

TASKS = ("classify", "lm")
# At most this many paths in a refusal that lists the model's modules.
_LISTED = 40


def path_name(parts: Sequence[Any]) -> str:
  """``("blocks", 3, "conv1")`` -> ``"blocks/3/conv1"``, the form rules and block patterns match."""
  return "/".join(str(p) for p in parts)


def _listing(paths: Sequence[str]) -> str:
  shown = ", ".join(paths[:_LISTED]) or "(none)"
  return shown + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


class _Attached(nnx.Module):
  """What both attached models share: the user's model, the sample it was read with, the rules."""

  gated = False

  def __init__(self, model: nnx.Module, *, input_shape: tuple[int, ...], input_dtype: str,
               task: str, rules: tuple[Rule, ...], layer_key: LayerKey):
    self.model = model  # The user's model: its classes swapped, its Variables and paths kept.
    self.input_shape = input_shape
    self.input_dtype = input_dtype
    self.task = task
    self.rules = rules
    self.layer_key = layer_key

  @property
  def image_size(self) -> int:
    """The side of the images the model was attached with (classification)."""
    return self.input_shape[1]

  @property
  def context(self) -> int:
    """The tokens per window the model was attached with (language models)."""
    return self.input_shape[1]

  def layers(self) -> list[tuple[str, AttachedLayer]]:
    """Every attached layer with its path inside ``model``, in graph order."""
    return [(path_name(p), n) for p, n in nnx.iter_graph(self.model)
            if isinstance(n, AttachedLayer)]

  def float_forward(self, x: jax.Array) -> jax.Array:
    """The user's forward pass, every layer at full precision."""
    with routing(Route(full=True)):
      return self.model(x)

  def _kind(self, plan: LayerPlan, gated: bool) -> tuple[str, tuple[int, int, int] | None, int]:
    if plan.action == FIXED:
      return "fixed", (plan.bits.a, plan.bits.g, plan.bits.w), -1
    if plan.action == FULL:
      return "fp", None, -1
    if gated:
      return ("gated", None, plan.block) if plan.block >= 0 else ("fp", None, -1)
    return "static", None, -1

  def layer_macs(self, *, plain: bool = False) -> list[cost.LayerMACs]:
    """Every attached layer call with its forward MACs per sample, labelled by its plan.

    plain: label the layers as the model attached without blocks runs them (the
    FP32 and SBM 8/8 references of a gated run), without building that model.
    """
    plans = {path: layer.fractrain for path, layer in self.layers()}
    sample = (1,) + tuple(self.input_shape[1:])
    rows = []
    for path, macs, _ in capture_records(self, lambda m, x: m.float_forward(x), sample,
                                         jnp.dtype(self.input_dtype)):
      plan = plans[path_name(path[1:])]  # path[0] is "model".
      kind, fixed, block = self._kind(plan, self.gated and not plain)
      rows.append(cost.LayerMACs(plan.path, macs, kind, block=block, fixed=fixed))
    return rows

  def describe(self, layers: Sequence[cost.LayerMACs] | None = None) -> str:
    """One row per attached layer: path, Flax class, parameters, MACs per sample, precision.

    layers: this model's ``layer_macs()``, if already at hand.
    """
    macs: dict[str, float] = {}
    for row in layers or self.layer_macs():  # In call order; a layer called twice counts twice.
      macs[row.name] = macs.get(row.name, 0) + row.macs
    layers = dict(self.layers())
    order = list(macs) + [p for p in layers if p not in macs]  # Then those never called.
    lines = [f"{'layer':<32} {'class':<8} {'params':>10} {'MACs/sample':>12}  precision"]
    for path in order:
      layer = layers[path]
      params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(layer, nnx.Param)))
      lines.append(f"{path:<32} {base_class(layer).__name__:<8} {params:>10,} "
                   f"{int(macs.get(path, 0)):>12,}  {layer.fractrain.describe()}")
    return "\n".join(lines)


class AttachedModel(_Attached):
  """``model(x, bits=None, *, key=None) -> logits``: the user's model at one precision."""

  num_blocks = 0

  def __call__(self, x: jax.Array, bits: tuple[int, int] | None = None, *,
               key: jax.Array | None = None) -> jax.Array:
    """Logits at ``bits = (b_a, b_g)`` (weights at ``b_a``); ``None`` is FP32.

    key: the rounding key of the gradient quantizers; each layer call folds in
    its own (``layer_key``).
    """
    static = None if bits is None else StaticBits(a=bits[0], g=bits[1], w=bits[0])
    with routing(Route(static=static, full=bits is None, key=key, layer_key=self.layer_key)):
      return self.model(x)


class GatedAttachedModel(Candidates, _Attached):
  """``model(x, *, key=None, tau=1.0, force=None, full_precision=False) -> (logits, masks)``.

  masks: ``(num_blocks, batch, K)``, or ``(num_blocks, batch, tokens, K)`` for
  a per-token gate, one-hot in the forward pass.
  """

  gated = True

  def __init__(self, model: nnx.Module, *, gate: Gate, block_paths: tuple[str, ...],
               per_token: bool, gate_head: str, candidates: tuple, **kwargs):
    super().__init__(model, **kwargs)
    self.gate = gate
    self.block_paths = block_paths
    self.per_token = per_token
    self.gate_head = gate_head
    self.fw_candidates, self.bw_candidates, self.weight_bits = candidates

  @property
  def num_blocks(self) -> int:
    return len(self.block_paths)

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None, tau=1.0,
               force: int | None = None, full_precision: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """Logits and masks; the arguments mean what they mean for ``models.GatedModel``.

    key: split into (Gumbel noise, gradient rounding). force: candidate index
    for every block and sample (the gate does not run). full_precision: every
    layer in FP32 (fine-tuning); the gate still runs and its masks are returned.
    """
    route = GatedRoute(self, key=key, tau=tau, force=force, full=full_precision)
    with routing(route):
      logits = self.model(x)
    return logits, route.stacked_masks()


def _sample(sample: Any) -> jax.ShapeDtypeStruct:
  shape, dtype = getattr(sample, "shape", None), getattr(sample, "dtype", None)
  if shape is None or dtype is None or len(shape) < 1:
    raise ConfigError(f"sample={sample!r}; expected an array or jax.ShapeDtypeStruct of one "
                      "input batch, e.g. (1, 32, 32, 3) images or (1, 64) int32 tokens")
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _compile(patterns: Sequence[str], what: str) -> tuple[str, ...]:
  if isinstance(patterns, str):
    patterns = (patterns,)
  for p in patterns:
    try:
      re.compile(p)
    except (re.error, TypeError) as err:
      raise ConfigError(f"{what} pattern {p!r} is not a regular expression: {err}") from None
  return tuple(patterns)


def _surgery(model: nnx.Module, patterns: tuple[str, ...], act_momentum: float
             ) -> tuple[nnx.Module, list[str], dict[str, list[str]]]:
  """The clone with attached layers and gated blocks; every module path; each pattern's hits."""
  modules: list[str] = []
  hits: dict[str, list[str]] = {p: [] for p in patterns}

  def visit(path, node):
    if not isinstance(node, nnx.Module):
      return node
    name = path_name(path)
    if isinstance(node, (AttachedLayer, gated_blocks.GatedBlock)):
      raise ConfigError(f"module {name or '(root)'} is already attached: attach the user's "
                        "model, not an attached one")
    modules.append(name)
    if is_attachable(node):
      attach_layer(node, name, act_momentum)
    matched = [p for p in patterns if path and re.fullmatch(p, name)]
    for p in matched:
      hits[p].append(name)
    if matched:
      swap_class(node, gated_blocks.gated_class(type(node)))
      node.fractrain_block = name
    return node

  return nnx.recursive_map(visit, model), modules, hits


def _discover(model: nnx.Module, sample: jax.ShapeDtypeStruct) -> Discovery:
  """One abstract full-precision pass on ``sample``: what runs, in what order, on what."""
  discovery = Discovery()
  graphdef, state = nnx.split(model)
  inside: list[str] = []

  def run(state):
    copy = nnx.merge(graphdef, state)  # Lives and dies inside this trace.
    with routing(discovery):
      out = copy(jnp.zeros(sample.shape, sample.dtype))
    inside.extend(discovery.inside_transforms())
    return out

  try:
    jax.eval_shape(run, state)
  except UserError:
    raise
  except Exception as err:  # The user's model on the sample: one line, the cause chained.
    raise ConfigError(f"the model fails on a sample of {sample.dtype} {sample.shape}: "
                      f"{one_line(err)}") from err
  if inside:
    raise ConfigError(f"{inside[0]} runs inside a JAX transform (nnx.vmap, nnx.scan, a "
                      "jax.lax loop); FracTrain attaches to layers and blocks that the forward "
                      "pass calls directly, each with its own per-tensor range, cost and gate "
                      "decision")
  return discovery


def _block_order(discovery: Discovery, block_paths: Sequence[str]) -> list[tuple[str, tuple, Any]]:
  """The gated blocks in the order they run, each refused unless it runs exactly once."""
  runs: dict[str, int] = {}
  for path, _, _ in discovery.blocks:
    runs[path] = runs.get(path, 0) + 1
  for path in block_paths:
    if path not in runs:
      raise ConfigError(f"gated block {path} never runs in a forward pass on the sample; "
                        "name blocks the model's __call__ calls")
    if runs[path] > 1:
      raise ConfigError(f"gated block {path} runs {runs[path]} times in one forward pass; "
                        "the gate decides once per block: name modules called once each")
  return list(discovery.blocks)


def _read_mode(order: Sequence[tuple[str, tuple, Any]]) -> str:
  """Pooled or per token, the same for every gated block (one LSTM state runs through them)."""
  modes = [gated_blocks.read_mode(path, shape, dtype) for path, shape, dtype in order]
  for (path, shape, _), mode in zip(order, modes):
    if mode != modes[0]:
      raise ConfigError(f"gated blocks {order[0][0]} {order[0][1]} and {path} {shape} read "
                        "different kinds of input; one gate carries one LSTM state, per sample "
                        "or per token, through every block")
  if modes and modes[0] == gated_blocks.PER_TOKEN:
    tokens = sorted({shape[:2] for _, shape, _ in order})
    if len(tokens) > 1:
      raise ConfigError(f"gated blocks read sequences of shapes {tokens}; the per-token gate "
                        "carries one LSTM state per token, so every block must see the same tokens")
  return modes[0] if modes else gated_blocks.POOLED


def _block_of(path: str, block_paths: Sequence[str]) -> int:
  for index, block in enumerate(block_paths):
    if path == block or path.startswith(block + "/"):
      return index
  return -1


def attach(model: nnx.Module, sample: Any, *, rules: Sequence[str | Rule] = path_rules.DEFAULT,
           blocks: Sequence[str] = (), fw_candidates: Sequence[int] | None = None,
           bw_candidates: Sequence[int] | None = None, weight_bits: int | None = None,
           gate: str = "gumbel", gate_head: str = "auto", gate_init: str = "default",
           act_momentum: float = 0.9, layer_key: LayerKey = fold_by_call,
           rngs: nnx.Rngs | None = None, task: str | None = None
           ) -> AttachedModel | GatedAttachedModel:
  """FracTrain's quantized layers (and, with ``blocks``, DFQ's gate) on ``model``.

  model: the user's NNX model, called as ``model(x) -> logits``; it is not
    changed (the result is a clone sharing its Variables).
  sample: one input batch (an array or ``jax.ShapeDtypeStruct``); only its
    shape and dtype are used.
  rules: ``rules.py``'s ordered rules; ``DEFAULT`` keeps the first and last
    layers called at full precision and quantizes the rest.
  blocks: path patterns of the gated blocks (e.g. ``r"blocks/\\d+"``); empty
    for SBM and PFQ, which need no gate.
  fw_candidates, bw_candidates, weight_bits: DFQ's candidates (SPEC section 4;
    by default the CIFAR ones, (3,4,4,6,6) / (6,6,8,8,12) with 4-bit weights).
  gate, gate_head, gate_init: as ``models.GatedModel``'s; ``gate_head="auto"``
    is the CIFAR head for pooled inputs and the LM's for per-token ones.
  act_momentum: momentum of every quantized layer's running input range.
  layer_key: ``(key, path, call) -> key``, each layer call's rounding key.
  rngs: initializes the gate (gated models only).
  task: "classify" or "lm" (next-token logits); by default "lm" for integer inputs.
  """
  sample = _sample(sample)
  task = task or ("lm" if jnp.issubdtype(sample.dtype, jnp.integer) else "classify")
  if task not in TASKS:
    raise ConfigError(f"task={task!r}; expected one of {TASKS}")
  patterns = _compile(blocks, "block")
  rule_list = path_rules.parse_all(rules)
  if patterns and rngs is None:
    raise ValueError("attach(..., blocks=...) builds a gate: pass rngs=nnx.Rngs(seed)")
  attached, modules, hits = _surgery(model, patterns, act_momentum)
  for pattern, found in hits.items():
    if not found:
      raise ConfigError(f"block pattern {pattern!r} matches no module; the model's modules: "
                        f"{_listing([m for m in modules if m])}")
  block_set = sorted({p for found in hits.values() for p in found})
  for outer in block_set:
    inner = [p for p in block_set if p.startswith(outer + "/")]
    if inner:
      raise ConfigError(f"gated blocks {outer} and {inner[0]} are nested; name blocks that do "
                        "not contain one another")
  discovery = _discover(attached, sample)
  order = _block_order(discovery, block_set)
  block_paths = tuple(path for path, _, _ in order)
  layers = [(path_name(p), n) for p, n in nnx.iter_graph(attached) if isinstance(n, AttachedLayer)]
  called = list(dict.fromkeys(path for path, _ in discovery.layers))
  rule_list = rule_list or path_rules.default_rules(called, keep_first=task != "lm")
  decided = path_rules.resolve(rule_list, [p for p, _ in layers])
  for path, layer in layers:
    rule = decided[path]
    action = FULL if rule is None else rule.action
    layer.fractrain = LayerPlan(path, action, None if rule is None else rule.bits,
                                _block_of(path, block_paths))
  common = dict(input_shape=tuple(sample.shape), input_dtype=jnp.dtype(sample.dtype).name,
                task=task, rules=rule_list,
                layer_key=layer_key)
  if not patterns:
    return AttachedModel(attached, **common)
  mode = _read_mode(order)
  per_token = mode == gated_blocks.PER_TOKEN
  default_a, default_g, default_w = DEFAULT_CANDIDATES[32]
  candidates = check_candidates(default_a if fw_candidates is None else fw_candidates,
                                default_g if bw_candidates is None else bw_candidates,
                                default_w if weight_bits is None else weight_bits)
  head = ("lm" if per_token else "cifar") if gate_head == "auto" else gate_head
  gate_module = Gate([shape[-1] for _, shape, _ in order], len(candidates[0]), sampler=gate,
                     head=head, init=gate_init, per_token=per_token, rngs=rngs)
  return GatedAttachedModel(attached, gate=gate_module, block_paths=block_paths,
                            per_token=per_token, gate_head=head, candidates=candidates,
                            **common)


def detach(model: nnx.Module) -> nnx.Module:
  """The user's model back: plain Flax layers and blocks, sharing the attached Variables.

  model: an attached model, or its ``.model``. The quantizers' running input
  ranges are dropped; every parameter (and the user's own state, e.g.
  BatchNorm statistics) is the attached model's.
  """
  inner = model.model if isinstance(model, _Attached) else model

  def restore(path, node):
    del path
    if isinstance(node, gated_blocks.GatedBlock):
      delattr(node, "fractrain_block")
      swap_class(node, type(node)._fractrain_base)
    if isinstance(node, AttachedLayer):
      detach_layer(node)
    return node

  return nnx.recursive_map(restore, inner)
