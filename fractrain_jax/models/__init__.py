"""Model registry: ``create(name, *, num_classes, rngs, **options)``.

Backbones (``available()``): CIFAR ResNet-20/38/74/110/152 and MobileNetV2
(32x32 inputs), ImageNet ResNet-18/34/50 (224x224), and a tiny CIFAR ResNet-8
for smoke runs. Each is also available as
``gated_<name>``, the DFQ model of SPEC section 4 (``names()`` lists all).
``transformer_lm`` is a causal Transformer language model
(``transformer_lm.py``); ``num_classes`` is its vocabulary size and its
options are ``LM_OPTIONS``. ``gated_transformer_lm`` is its DFQ model
(``gated_lm.py``: a per-token gate before every sublayer), taking both the
LM's options and the gated ones.

Plain models: ``model(x, bits=None, *, key=None) -> logits``.
Gated models: ``model(x, *, key=None, tau=1.0, force=None, full_precision=False)
-> (logits, masks)`` (masks per block and sample, or per sublayer and token), options ``fw_candidates``, ``bw_candidates``,
``weight_bits``, ``gate``, ``gate_head``, ``gate_init`` and ``forward`` (``GatedModel``).
Both take ``act_momentum``.
Every model has ``task`` (``"classify"``, or ``"lm"`` for the LM), ``num_blocks`` and
``layer_macs()``; the CNNs also ``image_size``.

What it may import: ``quant``, ``layers``, ``norm``, ``cost`` and ``errors``; never
``attach/``, ``data/``, the methods and steps that use a model, ``run/`` or
``report/`` (``tests/test_layout.py`` checks it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flax import nnx

from fractrain_jax.layers import QuantizedLayer
from fractrain_jax.models.backbone import Backbone, Plan
from fractrain_jax.models.gated import GatedModel
from fractrain_jax.models.gated_lm import GatedTransformerLM
from fractrain_jax.models.mobilenet_v2 import mobilenet_v2
from fractrain_jax.models.resnet_cifar import cifar_resnet
from fractrain_jax.models.resnet_imagenet import imagenet_resnet
from fractrain_jax.models.transformer_lm import POSITIONS, TransformerLM

GATED_PREFIX = "gated_"
LM = "transformer_lm"
# The Transformer LM's options (``config.model.lm``), with their defaults.
LM_OPTIONS = ("depth", "width", "heads", "mlp_ratio", "context", "dropout", "positions", "tied")

_BACKBONES: dict[str, Callable[..., Backbone]] = {
    "resnet8": functools.partial(cifar_resnet, 8),  # Not in the paper: for smoke runs and tests.
    "resnet20": functools.partial(cifar_resnet, 20),
    "resnet38": functools.partial(cifar_resnet, 38),
    "resnet74": functools.partial(cifar_resnet, 74),
    "resnet110": functools.partial(cifar_resnet, 110),
    "resnet152": functools.partial(cifar_resnet, 152),
    "mobilenet_v2": mobilenet_v2,
    "resnet18": functools.partial(imagenet_resnet, 18),
    "resnet34": functools.partial(imagenet_resnet, 34),
    "resnet50": functools.partial(imagenet_resnet, 50),
}


def available() -> tuple[str, ...]:
  """The backbone names; each is also accepted as ``gated_<name>``."""
  return tuple(_BACKBONES)


# The gated models' options (``GatedModel``, ``GatedTransformerLM``).
GATED_OPTIONS = ("fw_candidates", "bw_candidates", "weight_bits", "gate", "gate_head",
                 "gate_init", "forward")


def names() -> tuple[str, ...]:
  """Every name ``create`` accepts: the backbones, their gated versions, then the LM's two."""
  return available() + tuple(GATED_PREFIX + n for n in _BACKBONES) + (LM, GATED_PREFIX + LM)


def create(name: str, *, num_classes: int, rngs: nnx.Rngs, act_momentum: float | None = None,
           **options: Any) -> Backbone | GatedModel | TransformerLM | GatedTransformerLM:
  """The model called ``name``.

  act_momentum: momentum of every quantized layer's running input range
    (SPEC section 1; ``None`` keeps the layers' 0.9).
  options: the gated models' ``GATED_OPTIONS``; the LM's ``LM_OPTIONS``
    (the gated LM takes both; plain CNNs take none).
  """
  if name in (LM, GATED_PREFIX + LM):
    gated = name != LM
    accepted = LM_OPTIONS + (GATED_OPTIONS if gated else ())
    unknown = set(options) - set(accepted)
    if unknown:
      raise ValueError(f"{name} takes the options {accepted}, got {sorted(unknown)}")
    lm = TransformerLM(num_classes, rngs=rngs, **{k: v for k, v in options.items()
                                                  if k in LM_OPTIONS})
    lm = _set_momentum(lm, act_momentum)
    if not gated:
      return lm
    return GatedTransformerLM(lm, rngs=rngs, **{k: v for k, v in options.items()
                                                if k in GATED_OPTIONS})
  gated = name.startswith(GATED_PREFIX)
  base = name[len(GATED_PREFIX):] if gated else name
  if base not in _BACKBONES:
    raise ValueError(f"unknown model {name!r}; accepted names: {', '.join(names())}")
  if not gated and options:
    raise ValueError(f"{name} takes no options, got {sorted(options)}; the options "
                     f"are for gated models such as {GATED_PREFIX}{name}")
  backbone = _set_momentum(_BACKBONES[base](num_classes=num_classes, rngs=rngs), act_momentum)
  if not gated:
    return backbone
  unknown = set(options) - set(GATED_OPTIONS)
  if unknown:
    raise ValueError(f"{name} takes the options {GATED_OPTIONS}, got {sorted(unknown)}")
  return GatedModel(backbone, rngs=rngs, **options)


def _set_momentum(model: nnx.Module, act_momentum: float | None) -> nnx.Module:
  if act_momentum is not None:
    if not 0.0 <= act_momentum < 1.0:
      raise ValueError(f"act_momentum={act_momentum!r}; expected a value in [0, 1)")
    model.set_attributes(QuantizedLayer, act_momentum=float(act_momentum))
  return model


__all__ = ["Backbone", "GATED_OPTIONS", "GatedModel", "GatedTransformerLM", "LM", "LM_OPTIONS", "POSITIONS", "Plan", "TransformerLM",
           "available", "create", "names"]
