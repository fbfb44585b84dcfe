"""Which layers of a user's model are quantized: ordered path rules, first match wins.

A rule is written ``ACTION:REGEX`` (``config.model.quantize`` holds them as
strings) and matches a layer whose path, its attribute names and list
indices joined by ``/`` (``blocks/3/conv1``), the regex matches in full:

- ``q:REGEX``: quantized at the step's precision (the static or PFQ bits;
  a gated block's choice inside a gated block);
- ``fp:REGEX``: full precision always, as the authors keep the first conv
  and the classifier;
- ``A/G:REGEX`` or ``A/G/W:REGEX``: held at forward ``A``, backward ``G`` and
  weight ``W`` bits (``W = A`` when omitted) whenever the model is
  quantized, as MobileNetV2's depthwise convs are held at 8/16/8.

The first rule that matches a layer decides it; a layer no rule matches stays
full precision, and a rule that matches no layer is an error that lists the
model's layer paths (a misspelt pattern must not silently quantize nothing).
Without rules (``DEFAULT``), every layer is quantized but the first and the
last one the forward pass calls: the stem and the classifier of a CNN, the
patch embedding and the head of a ViT, as the authors keep them. A language
model (integer input) keeps only its output layer: its first layer is the
embedding, which is a lookup, not a layer FracTrain quantizes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

from fractrain_jax.errors import ConfigError
from fractrain_jax.layers import StaticBits

QUANTIZED = "q"
FULL = "fp"
FIXED = "fixed"
ACTIONS = (QUANTIZED, FULL, FIXED)
DEFAULT = ()  # No rules: the first and last layers called full precision, the rest quantized.
FORMS = "'q:REGEX', 'fp:REGEX', 'A/G:REGEX' or 'A/G/W:REGEX'"


@dataclasses.dataclass(frozen=True)
class Rule:
  """One rule: the layers whose path ``pattern`` matches in full get ``action``."""
  pattern: str
  action: str = QUANTIZED
  bits: StaticBits | None = None  # The held precision of a FIXED rule.

  def __post_init__(self):
    if self.action not in ACTIONS:
      raise ValueError(f"Rule action {self.action!r}; expected one of {ACTIONS}")
    if (self.action == FIXED) != (self.bits is not None):
      raise ValueError(f"Rule {self.pattern!r}: bits go with action {FIXED!r} only")
    try:
      re.compile(self.pattern)
    except re.error as err:
      raise ConfigError(f"rule pattern {self.pattern!r} is not a regular expression: "
                        f"{err}") from None

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None

  def __str__(self) -> str:
    if self.action == FIXED:
      return f"{self.bits.a}/{self.bits.g}/{self.bits.w}:{self.pattern}"
    return f"{self.action}:{self.pattern}"


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What sets one attached layer's precision: static under jit, part of the graph.

  block: the index of the gated block the layer sits in, -1 outside every one.
  """
  path: str
  action: str
  bits: StaticBits | None = None
  block: int = -1

  def describe(self) -> str:
    if self.action == FIXED:
      return f"held at {self.bits.a}/{self.bits.g}/{self.bits.w}"
    if self.action == FULL:
      return "full precision"
    return "quantized" if self.block < 0 else f"gated block {self.block}"


def _bits(text: str, rule: str) -> StaticBits:
  parts = text.split("/")
  if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
    raise ConfigError(f"quantize rule {rule!r}; expected {FORMS}")
  a, g = int(parts[0]), int(parts[1])
  w = int(parts[2]) if len(parts) == 3 else a
  for name, b in (("A", a), ("G", g), ("W", w)):
    if not 1 <= b <= 32:
      raise ConfigError(f"quantize rule {rule!r}: {name}={b} is outside 1..32 bits")
  return StaticBits(a=a, g=g, w=w)


def parse(text: str | Rule) -> Rule:
  """``'fp:head'`` -> ``Rule('head', 'fp')``; a ``Rule`` passes through."""
  if isinstance(text, Rule):
    return text
  if not isinstance(text, str) or ":" not in text:
    raise ConfigError(f"quantize rule {text!r}; expected {FORMS}")
  action, pattern = text.split(":", 1)
  if action in (QUANTIZED, FULL):
    return Rule(pattern, action)
  return Rule(pattern, FIXED, _bits(action, text))


def parse_all(rules: Iterable[str | Rule]) -> tuple[Rule, ...]:
  if isinstance(rules, (str, Rule)):
    rules = (rules,)
  return tuple(parse(r) for r in rules)


def default_rules(called: Sequence[str], *, keep_first: bool = True) -> tuple[Rule, ...]:
  """``DEFAULT``: the first layer called (``keep_first``) and the last one full precision, the
  rest quantized. A language model's first layer is its embedding, which is not a
  layer FracTrain quantizes, so its first projection is not kept (``keep_first=False``)."""
  if not called:
    return ()
  ends = dict.fromkeys(((called[0],) if keep_first else ()) + (called[-1],))
  return tuple(Rule(re.escape(p), FULL) for p in ends) + (Rule(".*", QUANTIZED),)


def resolve(rules: Sequence[Rule], paths: Sequence[str]) -> dict[str, Rule | None]:
  """Each layer path's deciding rule (None: no rule matched, full precision).

  paths: every attachable layer. A rule that matches nothing raises ConfigError.
  """
  for rule in rules:
    if not any(rule.matches(p) for p in paths):
      raise ConfigError(f"quantize rule '{rule}' matches no layer; the model's layers: "
                        f"{', '.join(paths) or '(none)'}")
  return {p: next((r for r in rules if r.matches(p)), None) for p in paths}
