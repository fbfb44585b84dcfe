"""Early refusal of bad configurations, before any data is read or anything compiles.

``validate(config)`` walks the keys of ``defaults.py`` and raises a
``ValueError`` naming the key, the bad value and what would be accepted. A
mistake found here costs a second; found by the trainer it costs a compile,
or a whole run (a PFQ schedule one stage short fails only at the last turning
point). ``check_workdir(path)`` proves the output directory is writable.
"""

from __future__ import annotations

import numbers
import os
import pathlib
import re
from typing import Any, Sequence

import ml_collections

# Accepted values come from the modules that own them, so they cannot drift apart.
from fractrain_jax import attach, cost, data, defaults, kernels, methods, models, optim, quant
from fractrain_jax.errors import ConfigError, os_reason
from fractrain_jax.data import text as text_data
from fractrain_jax.models import gate, gated
from fractrain_jax.run.workdir import probe_write

LR_SCHEDULES = optim.LR_SCHEDULES
GATES = gate.SAMPLERS
GATE_HEADS = ("auto",) + tuple(gate.HEADS)
GATE_INITS = gate.INITS
FORWARDS = gated.FORWARDS
MAX_BITS = quant.MAX_BITS
# The trainer adds this prefix itself for 'dfq' and 'frac'.
GATED_PREFIX = models.GATED_PREFIX


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  """config['a.b.c'] with a ValueError naming the key when it is missing."""
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      raise ConfigError(
          f"config.{key} is missing; start from configs/default.py, which "
          "defines every key") from None
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_at_least(config, key: str, minimum: int) -> int:
  value = _get(config, key)
  if not _is_int(value) or value < minimum:
    raise ConfigError(f"config.{key}={value!r}; expected an int >= {minimum}")
  return int(value)


def _real_in(config, key: str, lo: float, hi: float | None = None, *,
             lo_open: bool = False, hi_open: bool = False) -> float:
  """A number in the interval lo..hi (open or closed at either end)."""
  value = _get(config, key)
  ok = _is_real(value)
  if ok:
    ok = value > lo if lo_open else value >= lo
  if ok and hi is not None:
    ok = value < hi if hi_open else value <= hi
  if not ok:
    interval = ("(" if lo_open else "[") + f"{lo}, "
    interval += "inf)" if hi is None else f"{hi}" + (")" if hi_open else "]")
    raise ConfigError(f"config.{key}={value!r}; expected a number in {interval}")
  return float(value)


def _choice(config, key: str, accepted: Sequence[str]) -> str:
  value = _get(config, key)
  if value not in accepted:
    raise ConfigError(f"config.{key}={value!r}; expected one of {tuple(accepted)}")
  return value


def _bits(key: str, value: Any) -> None:
  if not _is_int(value) or not 1 <= value <= MAX_BITS:
    raise ConfigError(
        f"config.{key}={value!r}; expected an int bit width in 1..{MAX_BITS}")


def _bits_tuple(config, key: str) -> tuple[int, ...]:
  value = _get(config, key)
  if not isinstance(value, (tuple, list)) or not value:
    raise ConfigError(
        f"config.{key}={value!r}; expected a non-empty tuple of bit widths "
        f"in 1..{MAX_BITS}")
  for b in value:
    if not _is_int(b) or not 1 <= b <= MAX_BITS:
      raise ConfigError(
          f"config.{key}={value!r} holds {b!r}; every entry must be an int "
          f"bit width in 1..{MAX_BITS}")
  return tuple(int(b) for b in value)


def _check_model(config) -> None:
  name = _get(config, "model.name")
  options = _get(config, "model.options")
  blocks = _get(config, "model.blocks")
  rules = _get(config, "model.quantize")
  if attach.is_factory(name):
    attach.load(name)  # Imports it: a missing module or factory is refused now.
    if not isinstance(options, (ml_collections.ConfigDict, dict)):
      raise ConfigError(f"config.model.options={options!r}; expected a ConfigDict of the "
                        f"keyword options of {name}")
    _patterns(blocks)
    if not isinstance(rules, (tuple, list)):
      raise ConfigError(f"config.model.quantize={rules!r}; expected a tuple of rules such as "
                        "('fp:head', 'q:.*')")
    attach.parse_all(rules)
    return
  names = tuple(models.available()) + (models.LM,)
  if name not in names:
    hint = ""
    if isinstance(name, str) and name.startswith(GATED_PREFIX):
      hint = (f" (give the backbone name {name[len(GATED_PREFIX):]!r}: the "
              "trainer adds the 'gated_' prefix itself for 'dfq' and 'frac')")
    raise ConfigError(f"config.model.name={name!r}; expected one of {names}{hint}, or "
                      f"{attach.factory.FORM} for a model of your own")
  if isinstance(options, ml_collections.ConfigDict):
    options = options.to_dict()
  for key, value in (("blocks", blocks), ("quantize", rules), ("options", options)):
    if value:
      raise ConfigError(f"config.model.{key}={value!r} is for a model of your own "
                        f"({attach.factory.FORM}); {name} has its own layers and blocks: "
                        "leave it empty")


def _patterns(blocks: Any) -> None:
  if not isinstance(blocks, (tuple, list)) or not all(isinstance(b, str) for b in blocks):
    raise ConfigError(f"config.model.blocks={blocks!r}; expected a tuple of path patterns "
                      "such as (r'blocks/\\d+',)")
  for pattern in blocks:
    try:
      re.compile(pattern)
    except re.error as err:
      raise ConfigError(f"config.model.blocks holds {pattern!r}, not a regular expression: "
                        f"{err}") from None


def _check_lm(config) -> None:
  """The Transformer LM's shape, and that it trains on token windows (and only it, or a
  model of the user's own, does)."""
  lm = _get(config, "model.name") == models.LM
  own = attach.is_factory(_get(config, "model.name"))
  dataset = _get(config, "data.dataset")
  text = data.find_source(dataset).task == "lm"
  if lm and not text:
    raise ConfigError(f"config.data.dataset={dataset!r}; {models.LM} trains on a word-level "
                      f"corpus: expected '{data.TEXT_PREFIX}PATH'")
  if text and not (lm or own):
    raise ConfigError(f"config.model.name={_get(config, 'model.name')!r}; a "
                      f"{data.TEXT_PREFIX}PATH dataset trains the language model: expected "
                      f"{models.LM!r} or a model of your own ({attach.factory.FORM})")
  for key in ("depth", "width", "heads", "mlp_ratio", "context"):
    _int_at_least(config, f"model.lm.{key}", 1)
  width, heads = _get(config, "model.lm.width"), _get(config, "model.lm.heads")
  if width % heads:
    raise ConfigError(f"config.model.lm.heads={heads}; expected a divisor of "
                      f"config.model.lm.width={width}")
  _real_in(config, "model.lm.dropout", 0.0, 1.0, hi_open=True)
  _choice(config, "model.lm.positions", models.POSITIONS)
  tied = _get(config, "model.lm.tied")
  if not isinstance(tied, bool):
    raise ConfigError(f"config.model.lm.tied={tied!r}; expected True or False")
  train = _choice(config, "data.text_train", text_data.SPLITS)
  test = _choice(config, "data.text_test", text_data.SPLITS)
  if text and train == test:
    raise ConfigError(f"config.data.text_test={test!r} is the training split too; expected "
                      "another split to evaluate on")


def _check_data(config) -> None:
  dataset = _get(config, "data.dataset")
  try:
    source = data.find_source(dataset)
  except ConfigError as err:
    raise ConfigError(f"config.data.dataset: {err}") from None
  data_dir = _get(config, "data.data_dir")
  if data_dir is not None and not isinstance(data_dir, str):
    raise ConfigError(f"config.data.data_dir={data_dir!r}; expected a str or None")
  train_subset = _int_at_least(config, "data.train_subset", 0)
  test_subset = _int_at_least(config, "data.test_subset", 0)
  if source.streamed and (train_subset or test_subset):
    raise ConfigError(
        f"config.data.train_subset={train_subset}, config.data.test_subset={test_subset}: "
        f"subsets are for in-memory datasets; {dataset} streams, expected 0")
  normalization = _choice(config, "data.normalization", data.sources.NORMALIZATIONS)
  if source.streamed and normalization == data.sources.MEASURED:
    raise ConfigError(f"config.data.normalization={normalization!r}; {dataset} streams, so "
                      "its training split is not measured: expected 'auto', 'cifar10' or "
                      "'imagenet'")
  _int_at_least(config, "data.image_size", 1)
  download = _get(config, "data.download")
  if not isinstance(download, bool):
    raise ConfigError(f"config.data.download={download!r}; expected True or False")


def _check_train(config) -> int:
  iters = _int_at_least(config, "train.iters", 1)
  for key in ("train.batch_size", "train.eval_every", "train.eval_batch_size",
              "train.log_every"):
    _int_at_least(config, key, 1)
  _int_at_least(config, "train.finetune_iters", 0)
  _int_at_least(config, "train.num_devices", 0)
  _int_at_least(config, "train.conv_weight_grad_split", -1)
  _choice(config, "train.kernels", kernels.CHOICES)
  return iters


def _check_optim(config, iters: int) -> None:
  _choice(config, "optim.name", optim.OPTIMIZERS)
  _real_in(config, "optim.lr", 0.0, lo_open=True)
  _real_in(config, "optim.momentum", 0.0, 1.0, hi_open=True)
  _real_in(config, "optim.weight_decay", 0.0)
  _choice(config, "optim.schedule", LR_SCHEDULES)
  _real_in(config, "optim.decay", 0.0, lo_open=True)
  boundaries = _get(config, "optim.boundaries")
  ok = isinstance(boundaries, (tuple, list)) and all(
      _is_int(b) and b >= 1 for b in boundaries)
  if ok:
    ok = all(a < b for a, b in zip(boundaries, boundaries[1:]))
  if not ok:
    raise ConfigError(
        f"config.optim.boundaries={boundaries!r}; expected a strictly "
        "increasing tuple of iterations >= 1 (may be empty)")
  warmup = _int_at_least(config, "optim.warmup_iters", 0)
  if warmup >= iters:
    raise ConfigError(
        f"config.optim.warmup_iters={warmup!r}; expected fewer than "
        f"config.train.iters={iters}")
  _real_in(config, "optim.warmup_lr", 0.0)


def _check_pfq(config) -> None:
  fw = _bits_tuple(config, "pfq.fw_schedule")
  bw = _bits_tuple(config, "pfq.bw_schedule")
  _int_at_least(config, "pfq.num_turning_points", 0)
  if len(fw) != len(bw):
    raise ConfigError(
        f"config.pfq.fw_schedule={fw} and config.pfq.bw_schedule={bw} have "
        f"{len(fw)} and {len(bw)} stages; expected the same number")
  _real_in(config, "pfq.eps", 0.0)
  _real_in(config, "pfq.alpha", 0.0, lo_open=True)
  # The indicator compares earlier losses with the last one: it needs two.
  _int_at_least(config, "pfq.window", 2)
  _int_at_least(config, "pfq.scale_epochs", 1)


def _check_dfq(config) -> None:
  _bits("dfq.weight_bits", _get(config, "dfq.weight_bits"))
  fw = _bits_tuple(config, "dfq.fw_candidates")
  bw = _bits_tuple(config, "dfq.bw_candidates")
  if len(fw) != len(bw):
    raise ConfigError(
        f"config.dfq.fw_candidates={fw} and config.dfq.bw_candidates={bw} "
        f"have {len(fw)} and {len(bw)} entries; expected one (fw, bw) pair "
        "per candidate")
  _real_in(config, "dfq.target_cp", 0.0, 100.0, lo_open=True)
  _real_in(config, "dfq.target_step", 0.0)
  _real_in(config, "dfq.beta", 0.0)
  _real_in(config, "dfq.relax", 0.0)
  _real_in(config, "dfq.range", 0.0)
  _choice(config, "dfq.gate", GATES)
  _real_in(config, "dfq.tau_start", 0.0, lo_open=True)
  _real_in(config, "dfq.tau_end", 0.0, lo_open=True)
  _choice(config, "dfq.cost_weighting", cost.WEIGHTINGS)
  _choice(config, "dfq.forward", FORWARDS)
  _choice(config, "dfq.gate_head", GATE_HEADS)
  _choice(config, "dfq.gate_init", GATE_INITS)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on the first bad key: its name, value and what is accepted.

  Every key is checked whatever the method, so a recipe file cannot carry a
  broken setting that surfaces only when someone switches methods; then the
  method checks what only its semantics define (``methods.Method.check``: the
  PFQ stage count, the FracTrain final target, the gated LM's forward). A key
  the schema lacks is refused first: a ConfigDict takes a misspelt key
  silently, and the run would train at the default.
  """
  unknown = defaults.unknown_key(config)
  if unknown is not None:
    raise ConfigError(defaults.unknown_key_error(unknown))
  method = methods.get(_choice(config, "method", methods.names()))
  seed = _get(config, "seed")
  if not _is_int(seed):
    raise ConfigError(f"config.seed={seed!r}; expected an int")
  _check_model(config)
  _check_data(config)
  _check_lm(config)
  iters = _check_train(config)
  _check_optim(config, iters)
  _bits("quant.fw_bits", _get(config, "quant.fw_bits"))
  _bits("quant.bw_bits", _get(config, "quant.bw_bits"))
  _real_in(config, "quant.act_momentum", 0.0, 1.0, hi_open=True)
  _check_pfq(config)
  _check_dfq(config)
  _int_at_least(config, "checkpoint.keep", 1)
  method.check(config)


def check_workdir(path: str | os.PathLike) -> pathlib.Path:
  """Creates ``path`` if needed and proves it writable; returns it absolute.

  Raises ValueError naming the path when it cannot be created or written, so
  a run does not fail at its first checkpoint, after the first compile.
  """
  workdir = pathlib.Path(path).expanduser().absolute()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe_write(workdir)
  except OSError as e:
    raise ConfigError(f"cannot write the workdir {workdir}: {os_reason(e)}") from None
  return workdir
