"""The training methods: one object per method, in one registry.

A method (``Method``) says, for a config, everything the trainer and the loop
need to know about it:

- the model it trains (``create_model``): the plain model, or its gated
  version (``gated``) with the options of ``config.dfq``;
- the precision of a step (``precision``) in each stage; fine-tuning is FP32
  whatever the method;
- whether PFQ's turning-point indicator runs (``uses_indicator``), what loss it
  reads (``indicator_loss``), and when a stage ends (``turning_point``);
- the target cp of each stage (``target_cp``, ``targets``) and DFQ's cost rule
  (``cost_rule``, SPEC section 4: the FracTrain script's or the DFQ script's);
- what makes two of its runs different runs (``identity``), its own config
  checks (``check``), and its words in the event log (``event_parts``).

``fp32``, ``static``, ``pfq``, ``dfq`` and ``frac`` are registered here; a new
method is one subclass and one ``register`` call (docs/DESIGN.md, "How to add
a method"). Outside this module no code compares a method's name.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_collections
from flax import nnx

import jax
import jax.numpy as jnp

from fractrain_jax import attach, cost, dfq, models, quant
from fractrain_jax.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Precision:
  """What one train or eval step runs at: frozen and hashable, a static argument of the step.

  bits: a plain model's (b_a, b_g) (weights at b_a, SPEC section 1); None is
    full precision (FP32, or a gated model's full-precision fine-tuning).
  gated: the gate picks each block's precision per sample (DFQ, FracTrain).
  """
  bits: tuple[int, int] | None = None
  gated: bool = False

  def __post_init__(self):
    if self.gated and self.bits is not None:
      raise ValueError(f"Precision(bits={self.bits}, gated=True): the gate picks the bits")
    if self.bits is not None:
      if not (isinstance(self.bits, tuple) and len(self.bits) == 2):
        raise ValueError(f"Precision.bits={self.bits!r}; expected None or a pair (b_a, b_g)")
      for b in self.bits:
        quant.check_bits(b, "Precision.bits")

  @property
  def full(self) -> bool:
    return self.bits is None and not self.gated

  def __str__(self) -> str:
    if self.gated:
      return "gated"
    return "fp32" if self.bits is None else f"{self.bits[0]}/{self.bits[1]} bits"


FP32 = Precision()
GATED = Precision(gated=True)
PHASES = ("train", "finetune")  # Fine-tuning (train.finetune_iters) runs in FP32.


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The options of the plain model: the LM's shape, a user factory's keywords, none for a CNN."""
  if attach.is_factory(config.model.name):
    return config.model.options.to_dict()
  if config.model.name != models.LM:
    return {}
  return {k: config.model.lm[k] for k in models.LM_OPTIONS}


def gate_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The registry options of a gated model (``models.GATED_OPTIONS``) from ``config.dfq``."""
  d = config.dfq
  return dict(fw_candidates=tuple(d.fw_candidates), bw_candidates=tuple(d.bw_candidates),
              weight_bits=d.weight_bits, gate=d.gate, forward=d.forward,
              gate_head=None if d.gate_head == "auto" else d.gate_head, gate_init=d.gate_init)


def plain_layer_macs(config: ml_collections.ConfigDict, num_classes: int,
                     model: nnx.Module | None = None) -> list[cost.LayerMACs]:
  """The plain model's layers (the FP32 and SBM 8/8 references of any run).

  model: the run's model; a model of the user's own labels its own layers as
  the plain model would (the same layers, rules and MACs).
  """
  if attach.is_factory(config.model.name):
    if model is None:
      raise ValueError(f"{config.model.name}: give the run's attached model")
    return model.layer_macs(plain=True)
  else:
    abstract = nnx.eval_shape(lambda: models.create(
        config.model.name, num_classes=num_classes, rngs=nnx.Rngs(0), **model_options(config)))
  return abstract.layer_macs()


def attach_user_model(config: ml_collections.ConfigDict, num_classes: int, seed: int,
                      input_shape: tuple[int, ...] | None, *, gated: bool) -> nnx.Module:
  """``config.model.name = "package.module:factory"``: the user's model, FracTrain attached.

  input_shape: one example's shape, from the data (``(H, W, 3)`` images, or
  ``(context,)`` token ids, which make it a language model).
  """
  if input_shape is None:
    raise ValueError(f"{config.model.name}: a model of your own needs the data's input_shape")
  user = attach.build(config.model.name, num_classes=num_classes, rngs=nnx.Rngs(seed),
                      options=model_options(config))
  lm = len(input_shape) == 1
  sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.int32 if lm else jnp.float32)
  options = dict(rules=tuple(config.model.quantize), act_momentum=config.quant.act_momentum)
  if gated:
    d = config.dfq
    options.update(blocks=tuple(config.model.blocks), fw_candidates=tuple(d.fw_candidates),
                   bw_candidates=tuple(d.bw_candidates), weight_bits=d.weight_bits,
                   gate=d.gate, gate_head=d.gate_head, gate_init=d.gate_init,
                   rngs=nnx.Rngs(seed + 1))
  return attach.attach(user, sample, **options)


class Method:
  """A training method; subclasses override what differs from a full-precision plain run."""

  name: str = ""
  gated: bool = False          # Trains the gated_<model> variant (DFQ's gate).
  uses_indicator: bool = False  # PFQ's turning-point indicator drives its stages.
  cost_rule: str | None = None  # The sign rule of DFQ's cost term (dfq.RULES).

  def create_model(self, config: ml_collections.ConfigDict, num_classes: int,
                   seed: int, input_shape: tuple[int, ...] | None = None) -> nnx.Module:
    """The model this method trains; ``num_classes`` is the LM's vocabulary size.

    input_shape: one example's shape (the data's ``input_shape``), which a
    model of the user's own (``package.module:factory``) is attached with.
    """
    name = config.model.name
    if attach.is_factory(name):
      return attach_user_model(config, num_classes, seed, input_shape, gated=self.gated)
    options = model_options(config)
    if self.gated:
      name = models.GATED_PREFIX + name
      options.update(gate_options(config))
    return models.create(name, num_classes=num_classes, rngs=nnx.Rngs(seed),
                         act_momentum=config.quant.act_momentum, **options)

  def step_precision(self, config: ml_collections.ConfigDict, stage: int,
                     phase: str = "train") -> Precision:
    """The precision of a step: the method's in ``stage``, FP32 in fine-tuning."""
    if phase not in PHASES:
      raise ValueError(f"phase={phase!r}; expected one of {PHASES}")
    return FP32 if phase == "finetune" else self.precision(config, stage)

  def precision(self, config: ml_collections.ConfigDict, stage: int) -> Precision:
    return GATED if self.gated else FP32

  def target_cp(self, config: ml_collections.ConfigDict, stage: int) -> float | None:
    """The steering-cp target in ``stage`` (gated methods); None otherwise."""
    return None

  def targets(self, config: ml_collections.ConfigDict) -> list[float]:
    """Every target the run may steer to (gated methods), to check against the reachable range."""
    return []

  def indicator_loss(self, record: dict[str, Any]) -> float:
    """The interval loss the indicator reads (Alg. 1's epoch loss): the training loss,
    with DFQ's signed cost term in it, as the authors' FracTrain script feeds it
    (train_frac.py:447, 454); the term is 0 for plain runs."""
    return record["train_loss"] + record["train_cost_term"]

  def turning_point(self, config: ml_collections.ConfigDict, step: int, indicator: Any,
                    record: dict[str, Any]) -> bool:
    """Whether the stage rises after the interval that ends at ``step`` (``record`` is its
    metrics line). Indicator methods ask PFQ's indicator; the others never turn."""
    return self.uses_indicator and indicator.update(self.indicator_loss(record))

  def turning_point_note(self, config: ml_collections.ConfigDict, stage: int) -> str:
    """What the new ``stage`` means, for the log line of a turning point."""
    return ""

  def identity(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings that make two runs of this method different runs (resuming checks them)."""
    return {}

  def check(self, config: ml_collections.ConfigDict) -> None:
    """This method's own config checks (ConfigError); the shared ones run first."""

  def log_reachable_targets(self, config: ml_collections.ConfigDict) -> None:
    """A gated method logs the reachable steering-cp range and warns about a target outside it.

    Not a refusal: the README's FracTrain recipe starts at 1.5, below the 1.758
    floor of the CIFAR candidates, in the authors' code too. Below the floor the
    cost term only pushes down (sign +1 at every step), above the ceiling only up.
    """
    d = config.dfq
    lo, hi = cost.steer_cp_range(d.fw_candidates, d.bw_candidates, d.weight_bits)
    log.info("Steering cp of gated %s with these candidates: %.3f%% (every block at the "
             "cheapest) to %.3f%% (every block at the dearest)", config.model.name, lo, hi)
    outside = [t for t in self.targets(config) if not lo <= t <= hi]
    if outside:
      log.warning("target cp %s outside the reachable steering-cp range %.3f-%.3f%% of these "
                  "candidates (fw %s, bw %s, weights %d bits): the gate cannot meet it",
                  ", ".join(f"{t:g}" for t in outside), lo, hi, tuple(d.fw_candidates),
                  tuple(d.bw_candidates), d.weight_bits)

  def event_parts(self, record: dict[str, Any]) -> list[str]:
    """This method's words in an evaluation's console line."""
    if record.get("fw_bits") is not None:
      return [f"stage {record['stage']} ({record['fw_bits']}/{record['bw_bits']} bits)"]
    return []


class FP32Method(Method):
  """Full precision throughout."""
  name = "fp32"


class Static(Method):
  """Every quantized layer at ``quant.fw_bits``/``quant.bw_bits`` (SBM 8/8 by default)."""
  name = "static"

  def precision(self, config, stage):
    return Precision((int(config.quant.fw_bits), int(config.quant.bw_bits)))

  def identity(self, config):
    return {"bits": [config.quant.fw_bits, config.quant.bw_bits]}


class PFQ(Method):
  """SPEC section 3: the precision rises stage by stage at the indicator's turning points."""
  name = "pfq"
  uses_indicator = True

  def precision(self, config, stage):
    return Precision((int(config.pfq.fw_schedule[stage]), int(config.pfq.bw_schedule[stage])))

  def turning_point_note(self, config, stage):
    return f", {self.precision(config, stage)}"

  def identity(self, config):
    return {"schedule": [list(config.pfq.fw_schedule), list(config.pfq.bw_schedule)]}

  def check(self, config):
    fw, turning_points = tuple(config.pfq.fw_schedule), config.pfq.num_turning_points
    if len(fw) != turning_points + 1:
      raise ConfigError(
          f"config.pfq.fw_schedule={fw} has {len(fw)} stages but "
          f"config.pfq.num_turning_points={turning_points}; expected "
          f"num_turning_points + 1 = {turning_points + 1} stages")


class DFQ(Method):
  """SPEC section 4: the gated model, steered towards one target cp (the DFQ script's sign rule)."""
  name = "dfq"
  gated = True
  cost_rule = "dfq"

  def target_cp(self, config, stage):
    return float(config.dfq.target_cp)

  def targets(self, config):
    return [self.target_cp(config, 0)]

  def identity(self, config):
    d = config.dfq
    identity = {"candidates": [list(d.fw_candidates), list(d.bw_candidates), d.weight_bits]}
    # Only where they differ from the defaults, so checkpoints written before
    # these options existed still match.
    if d.forward != "single":
      identity["forward"] = d.forward
    if d.gate_head != "auto":
      identity["gate_head"] = d.gate_head
    return identity

  def check(self, config):
    forward = config.dfq.forward
    if attach.is_factory(config.model.name):
      if not config.model.blocks:
        raise ConfigError(
            f"config.model.blocks is empty; {self.name} gates blocks of your model "
            f"{config.model.name}: name them by path, e.g. (r'blocks/\\d+',) or "
            "(r'layers/\\d+/(attn|mlp)',)")
      if forward != "single":
        raise ConfigError(f"config.dfq.forward={forward!r}; a model of your own runs 'single' "
                          "only (per_candidate is the authors' CIFAR ResNet computation)")
    if config.model.name == models.LM and forward != "single":
      raise ConfigError(
          f"config.dfq.forward={forward!r}; the gated {models.LM} chooses per token and runs "
          "'single' only (per_candidate is the authors' CIFAR CNN computation)")


class FracTrain(DFQ):
  """SPEC section 5: DFQ whose target rises at PFQ's turning points (the FracTrain script's rule)."""
  name = "frac"
  uses_indicator = True
  cost_rule = "frac"

  def target_cp(self, config, stage):
    return float(dfq.frac_target(stage, config.dfq.target_cp, config.dfq.target_step))

  def targets(self, config):
    return [self.target_cp(config, i) for i in range(config.pfq.num_turning_points + 1)]

  def turning_point_note(self, config, stage):
    return f", target cp {self.target_cp(config, stage):g}%"

  def check(self, config):
    super().check(config)
    final = self.targets(config)[-1]
    if final > 100.0:
      raise ConfigError(
          f"config.dfq.target_step={config.dfq.target_step!r} raises config.dfq.target_cp="
          f"{config.dfq.target_cp!r} to {final} after {config.pfq.num_turning_points} "
          "turning points; expected a final target <= 100")

  def event_parts(self, record):
    return [f"stage {record['stage']}"]


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds ``method`` under its ``name`` (a new name, or replacing one on purpose)."""
  if not (isinstance(method.name, str) and method.name):
    raise ValueError(f"{type(method).__name__} has no name")
  if method.cost_rule is not None and method.cost_rule not in dfq.RULES:
    raise ValueError(f"{method.name}: cost_rule={method.cost_rule!r}; expected one of "
                     f"{dfq.RULES}")
  _REGISTRY[method.name] = method
  return method


def unregister(name: str) -> None:
  _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
  """The registered methods' names, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> Method:
  """The method called ``name``; ConfigError listing the registered ones otherwise."""
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ConfigError(f"config.method={name!r}; expected one of {names()}") from None


for _method in (FP32Method(), Static(), PFQ(), DFQ(), FracTrain()):
  register(_method)
