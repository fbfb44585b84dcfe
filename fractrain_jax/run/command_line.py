"""Mistakes on main.py's command line, found before absl parses it and answered in one line.

``check(argv)`` loads the config file the way ``ml_collections.config_flags``
will (so a syntax error becomes ``FILE:LINE: message``, and an exception in
``get_config()`` one line), then checks that every ``--config.KEY=VALUE``,
and every key the file sets, is one of the schema's (``defaults.py``),
suggesting the nearest one (``did you mean config.train.iters?``). No JAX is imported here: main.py calls
it before it sets up the backend.
"""

from __future__ import annotations

import importlib.util
import pathlib
import traceback
from typing import Any, Sequence

from fractrain_jax import defaults
from fractrain_jax.errors import one_line

CONFIG_FLAG = "--config"


def _config_path(argv: Sequence[str]) -> str | None:
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(CONFIG_FLAG + "="):
      return arg.split("=", 1)[1]
    if arg == CONFIG_FLAG and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv: Sequence[str]) -> list[str]:
  """The keys of ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` arguments."""
  keys = []
  for arg in argv[1:]:
    if arg.startswith(CONFIG_FLAG + "."):
      keys.append(arg[len(CONFIG_FLAG) + 1:].split("=", 1)[0])
  return keys


def load(path: str) -> tuple[Any, str | None]:
  """``(config, None)`` from the file's ``get_config()``, or ``(None, one-line error)``."""
  file = pathlib.Path(path.split(":", 1)[0])
  if not file.is_file():
    return None, (f"config file {path!r} does not exist; the recipes are in configs/ "
                  "(e.g. --config configs/frac_cifar10.py)")
  spec = importlib.util.spec_from_file_location("_fractrain_config_check", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as err:
    return None, f"{err.filename}:{err.lineno}: {err.msg} (config file {path!r})"
  except Exception as err:  # pylint: disable=broad-except
    return None, _where(err, file, f"loading config file {path!r}")
  if not hasattr(module, "get_config"):
    return None, f"config file {path!r} defines no get_config()"
  argument = path.split(":", 1)[1] if ":" in path else None
  try:
    config = module.get_config() if argument is None else module.get_config(argument)
  except Exception as err:  # pylint: disable=broad-except
    return None, _where(err, file, f"get_config() of {path!r}")
  return config, None


def _where(err: BaseException, file: pathlib.Path, what: str) -> str:
  """``FILE:LINE: Type: message`` at the innermost frame in the config file."""
  line = next((f.lineno for f in reversed(traceback.extract_tb(err.__traceback__))
               if pathlib.Path(f.filename).resolve() == file.resolve()), None)
  place = f"{file}:{line}: " if line else ""
  return f"{place}{one_line(err, limit=None)} ({what})"


def check(argv: Sequence[str]) -> str | None:
  """The one-line error of ``argv``'s config file or overrides; None when they are good."""
  path = _config_path(argv)
  if path is None:
    return ("--config is required: a recipe from configs/ "
            "(e.g. --config configs/frac_cifar10.py)")
  config, error = load(path)
  if error is not None:
    return error
  known = set(defaults.keys(defaults.get_config()))
  for key in _overrides(argv):
    free = next((f for f in defaults.FREE_FORM if key.startswith(f + ".")), None)
    if free is not None:
      return (f"--config.{key}=...: config.{free} takes the factory's options as one Python "
              f"dict, e.g. --config.{free}=\"{{'{key[len(free) + 1:]}': VALUE}}\"")
    if key not in known:
      return defaults.unknown_key_error(key, f"in --config.{key}=...")
  # A ConfigDict takes a new key silently: a typo in the file would train at the default.
  key = defaults.unknown_key(config)
  if key is not None:
    return defaults.unknown_key_error(key, f"set in config file {path!r}")
  return None
