"""FracTrain on a model the user brings: PFQ, SBM, DFQ and FracTrain without changing its code.

    model = MyViT(num_classes=10, rngs=nnx.Rngs(0))          # plain nnx.Conv / Linear / Einsum
    q = attach(model, jnp.zeros((1, 32, 32, 3)))              # SBM, PFQ: q(x, (8, 8), key=key)
    g = attach(model, x, blocks=[r"blocks/\\d+"], rngs=nnx.Rngs(1))  # DFQ: g(x, key=key, tau=1.0)

``rules.py``: which layers are quantized (ordered ``ACTION:REGEX`` rules,
first match wins). ``layers.py``: the quantized forms of ``nnx.Conv``,
``nnx.Linear`` and ``nnx.Einsum``. ``blocks.py``: the gated-block hook and
what the gate reads. ``route.py``: how one forward pass hands each layer its
precision. ``model.py``: ``attach``, ``detach`` and the two attached models.
``factory.py``: ``config.model.name = "package.module:factory"``.

This package sits beside ``models/``, in the algorithm's layer. What it may
import: ``quant``, ``conv``, ``layers``, ``cost``, ``errors`` and ``models/`` (the gate,
the cost capture); never ``run/``, ``report/`` or the methods and steps that
use it (``tests/test_layout.py`` checks it).
"""

from fractrain_jax.attach.factory import build, is_factory, load
from fractrain_jax.attach.model import (AttachedModel, GatedAttachedModel, attach, detach,
                                        path_name)
from fractrain_jax.attach.route import fold_by_call
from fractrain_jax.attach.rules import DEFAULT, LayerPlan, Rule, parse, parse_all

__all__ = ["AttachedModel", "DEFAULT", "GatedAttachedModel", "LayerPlan", "Rule", "attach",
           "build", "detach", "fold_by_call", "is_factory", "load", "parse", "parse_all",
           "path_name"]
