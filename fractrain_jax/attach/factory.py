"""``config.model.name = "package.module:factory"``: a model of the user's own, by import path.

The factory is called as ``factory(num_classes=..., rngs=..., **options)``
(``num_classes`` is the vocabulary for text data) and returns an
``nnx.Module``; ``load`` finds it, ``build`` calls it. The module must be
importable: from the current directory (main.py puts it on ``sys.path``) or
from ``PYTHONPATH``. Every failure is one ``ConfigError`` line naming the
name and what would be accepted.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Mapping

from flax import nnx

from fractrain_jax.errors import ConfigError, one_line

_FORM = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
FORM = "package.module:factory"


def is_factory(name: Any) -> bool:
  """Whether ``name`` has the ``package.module:factory`` form (not whether it imports)."""
  return isinstance(name, str) and _FORM.fullmatch(name) is not None


def load(name: str) -> Callable[..., nnx.Module]:
  """The callable ``name`` points to; ConfigError when it does not import or is missing."""
  if not is_factory(name):
    raise ConfigError(f"config.model.name={name!r}; expected a model of the zoo or {FORM}")
  module_name, attribute = name.split(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as err:  # The user's module: any error in it is theirs, in one line.
    raise ConfigError(f"config.model.name={name!r}: cannot import {module_name} "
                      f"({one_line(err)}); run from the folder that holds it or add that "
                      "folder to PYTHONPATH") from None
  factory = getattr(module, attribute, None)
  if not callable(factory):
    found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                   and getattr(v, "__module__", None) == module.__name__)
    raise ConfigError(f"config.model.name={name!r}: {module_name} has no callable "
                      f"{attribute!r}; its own callables: {', '.join(found) or '(none)'}")
  return factory


def build(name: str, *, num_classes: int, rngs: nnx.Rngs,
          options: Mapping[str, Any] | None = None) -> nnx.Module:
  """``factory(num_classes=..., rngs=..., **options)``, checked to be an ``nnx.Module``."""
  factory = load(name)
  options = dict(options or {})
  try:
    model = factory(num_classes=num_classes, rngs=rngs, **options)
  except TypeError as err:
    raise ConfigError(f"{name}(num_classes=..., rngs=..., **{options}) failed: "
                      f"{one_line(err)}; config.model.options are passed as keywords") from None
  if not isinstance(model, nnx.Module):
    raise ConfigError(f"{name} returned {type(model).__name__}; expected an nnx.Module")
  return model
