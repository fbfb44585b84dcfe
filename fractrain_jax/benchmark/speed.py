"""Speed benchmarks: `python -m fractrain_jax.benchmark {quant,step,profile} [--json]`.

quant: forward + backward of one 3x3 conv (batch 128, 32x32, 16 channels),
  fully quantized (activations, weights, gradients) against the same conv in
  FP32, and their ratio, on XLA's kernels or (``--kernels xla onednn``) each in turn.
step: one whole training step (the jitted step that training runs, data
  augmentation on the device included) for each method: fp32, static (8/8),
  pfq (its first stage), dfq and frac (gated model), and dfq_per_candidate
  (dfq with the authors' per-candidate block forward, ``dfq.forward``),
  timed after compilation. ``--model transformer_lm`` times the LM
  (``fractrain_jax/defaults.py``'s shape, random token windows, ``--num-classes`` as
  the vocabulary; fp32, static, pfq, and dfq and frac with the LM recipes'
  candidates and DFQ target: its per-token gate; no per-candidate variants).
  The methods take turns (one untimed and one timed step each), so drift in
  the machine's speed affects them alike; each round starts one method later,
  so no method keeps the place after another. Each row has every round's step
  (``round_ms``) and the quartiles of its ratios to FP32's step of the same round
  (``round_ratio_to_fp32``), besides the ratio of medians.
profile: one step of each method by op class (``profile.py``): forward,
  input-gradient and weight-gradient convs, layout copies, quantizers, gate,
  optimizer, BN, the rest.

All timings are medians over repeated runs in one process, after warm-up.
Speed targets are checked here, never in unit tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Callable

from fractrain_jax.run import platform

# Benchmark variants beyond the registered methods: name -> (method, config overrides).
# *_xla: XLA's convs and BatchNorms, where auto runs oneDNN's (train.kernels="xla"). On XLA's
# too: *_xla_wgrad, every conv's weight gradient as XLA's one conv over the whole batch
# (train.conv_weight_grad_split=0); *_split_all, every conv's in chunks of 8 samples
# (=8), where auto splits only the convs with few input features (fractrain_jax/conv.py).
VARIANTS = {"dfq_per_candidate": ("dfq", {"dfq.forward": "per_candidate"}),
            "frac_per_candidate": ("frac", {"dfq.forward": "per_candidate"}),
            **{f"{m}_xla_wgrad": (m, {"train.conv_weight_grad_split": 0,
                                      "train.kernels": "xla"})
               for m in ("fp32", "pfq", "dfq")},
            **{f"{m}_split_all": (m, {"train.conv_weight_grad_split": 8,
                                      "train.kernels": "xla"})
               for m in ("fp32", "pfq", "dfq")},
            **{f"{m}_xla": (m, {"train.kernels": "xla"})
               for m in ("fp32", "static", "pfq", "dfq", "frac")}}
# Timed unless --methods names them (frac_per_candidate runs K forwards a step; the
# others measure a choice the defaults already made).
NOT_BY_DEFAULT = ("frac_per_candidate",
                  *(v for v in VARIANTS if v.endswith(("_xla_wgrad", "_split_all", "_xla"))))


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10) -> float:
  """Median wall time of fn() in seconds; fn must block until its result is ready."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_quant(args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from fractrain_jax import kernels
  from fractrain_jax.layers import QConv, StaticBits

  conv = QConv(16, 16, 3, rngs=nnx.Rngs(0))
  graphdef, params, batch_stats = nnx.split(conv, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (args.batch_size, 32, 32, 16))

  def make(bits, kernel):
    def loss(params, batch_stats, x, key):
      m = nnx.merge(graphdef, params, batch_stats, copy=True)
      with kernels.use(kernel):  # As a step on these kernels traces its model.
        y = m(x, bits, key=key)
      return jnp.sum(y * y), nnx.state(m, nnx.BatchStat)

    return jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))

  rows = []
  for kernel in args.kernels:
    if kernel == kernels.ONEDNN:
      kernels.resolve(kernel, jax.sharding.Mesh(jax.devices()[:1], ("data",)))  # Or say why not.
    first = len(rows)
    for name, bits in (("fp32", None), ("quantized_8_8", StaticBits(8, 8, 8)),
                       ("quantized_4_6", StaticBits(4, 6, 4))):
      step = make(bits, kernel)
      key = jax.random.key(1)
      seconds = time_fn(lambda: jax.block_until_ready(step(params, batch_stats, x, key)),
                        repeats=args.repeats)
      rows.append({"bench": "quant", "kernels": kernel, "variant": name, "ms": seconds * 1e3})
    for r in rows[first:]:
      r["ratio_to_fp32"] = r["ms"] / rows[first]["ms"]
  return rows


@dataclasses.dataclass
class StepRunner:
  """One method's Trainer with random CIFAR-shaped data (or token windows) on the device."""
  trainer: Any
  state: Any
  batch: tuple[Any, Any]
  precision: Any
  target_cp: Any
  tau: Any

  @classmethod
  def create(cls, method: str, *, model_name: str, batch_size: int, num_classes: int,
             seed: int = 0, num_examples: int = 2048, own: "OwnModel | None" = None
             ) -> "StepRunner":
    import jax.numpy as jnp
    import numpy as np

    from fractrain_jax import data, methods, steps

    config = step_config(method, model_name, batch_size, own)
    trained = methods.get(config.method)
    model = trained.create_model(config, num_classes, seed,
                                 input_shape=None if own is None else own.input_shape)
    rng = np.random.default_rng(seed)
    n = max(num_examples, 2 * batch_size)
    if model.task == "lm":  # Token windows and their next tokens.
      trainer = steps.Trainer(config, model, mean=None, std=None)
      tokens = rng.integers(0, num_classes, (n, model.context + 1), np.int32)
      images, labels = tokens[:, :-1], tokens[:, 1:]
    else:
      trainer = steps.Trainer(config, model, mean=data.CIFAR_MEAN, std=data.CIFAR_STD)
      size = model.image_size
      images = rng.integers(0, 256, (n, size, size, 3), np.uint8)
      labels = rng.integers(0, num_classes, (len(images),), np.int32)
    return cls(trainer=trainer, state=trainer.init_state(seed),
               batch=trainer.put_replicated((images, labels)),
               precision=trained.step_precision(config, 0),
               target_cp=jnp.float32(config.dfq.target_cp),
               tau=jnp.float32(config.dfq.tau_start))

  def step(self):
    fn = self.trainer.train_step(self.precision)
    self.state, metrics = fn(self.state, self.batch, self.target_cp, self.tau)
    return metrics


@dataclasses.dataclass(frozen=True)
class OwnModel:
  """How a model of the user's own (``package.module:factory``) is timed."""
  options: dict
  blocks: tuple[str, ...]
  quantize: tuple[str, ...]
  input_shape: tuple[int, ...]  # (H, W, 3) images, or (context,) tokens: a language model.


def step_config(name: str, model_name: str, batch_size: int, own: OwnModel | None = None):
  """The library's default config for method or variant ``name`` on ``model_name``.

  The LM (the zoo's, or a model of the user's own fed tokens) gets the gated
  LM's default candidates (``gated_lm.DEFAULT_CANDIDATES``, the LM recipes')
  and a target in the middle of their reachable range.
  """
  from fractrain_jax import cost, defaults, models
  from fractrain_jax.models import gated_lm

  config = defaults.get_config()
  config.method, overrides = VARIANTS.get(name, (name, {}))
  config.model.name = model_name
  config.train.batch_size = batch_size
  if own is not None:
    config.model.options.update(own.options)
    config.model.blocks, config.model.quantize = own.blocks, own.quantize
  if model_name == models.LM or (own is not None and len(own.input_shape) == 1):
    a, g, w = gated_lm.DEFAULT_CANDIDATES
    config.dfq.update(fw_candidates=a, bw_candidates=g, weight_bits=w,
                      target_cp=sum(cost.steer_cp_range(a, g, w)) / 2)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def timed_methods(requested: list[str] | None, model_name: str,
                  own: OwnModel | None = None) -> list[str]:
  """The methods and variants to time; ValueError naming a bad one and what is accepted."""
  from fractrain_jax import methods
  from fractrain_jax.errors import ConfigError

  accepted = list(methods.names()) + list(VARIANTS)
  if requested is None:  # Every one this model runs, but the slowest variants.
    requested = [n for n in accepted if n not in NOT_BY_DEFAULT]
    explicit = False
  else:
    explicit = True
  chosen = []
  for name in requested:
    if name not in accepted:
      raise ValueError(f"--methods: unknown {name!r}; accepted: {', '.join(accepted)}")
    config = step_config(name, model_name, 1, own)
    try:
      methods.get(config.method).check(config)
    except ConfigError as err:
      if explicit:
        raise ValueError(f"--methods {name} with --model {model_name}: {err}") from None
      continue
    chosen.append(name)
  return chosen


def turn_order(keys: list, round_index: int) -> list:
  """The order of the methods' turns in round ``round_index``: each round starts one method
  later, so that over ``len(keys)`` rounds every method takes every place once. With a
  fixed order the later of two equal steps was 3-8% slower in three runs (static 8/8 and
  PFQ on ResNet-38, 2 CPU cores; docs/RESULTS.md, "Seventh step")."""
  k = round_index % len(keys)
  return keys[k:] + keys[:k]


def round_ratios(times: list[float], base: list[float]) -> dict[str, float]:
  """The quartiles of ``times[i] / base[i]`` over the rounds ``i`` (a method's step and
  FP32's in the same round of turns).

  Why: the machine's speed drifts between rounds (on the 2-core CPU, medians of one
  method moved 30% from run to run); a step and its round's FP32 step see the same
  drift, so the spread of their ratios is the method's own, and its quartiles say how
  far one run's ratio can be trusted.
  """
  ratios = [t / b for t, b in zip(times, base, strict=True)]
  if len(ratios) == 1:
    return {"q1": ratios[0], "median": ratios[0], "q3": ratios[0]}
  q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
  return {"q1": q1, "median": median, "q3": q3}


def bench_step(args) -> list[dict]:
  """Every (model, method) in turn; ratios to each model's FP32 step and, with several
  models, to the first model's step of the same method."""
  import jax

  runners = {(model, method): StepRunner.create(
      method, model_name=model, batch_size=args.batch_size, num_classes=args.num_classes,
      seed=0, own=args.own.get(model))
      for model in args.model for method in args.methods[model]}
  for runner in runners.values():  # Compile, then warm up.
    for _ in range(2):
      jax.block_until_ready(runner.step())
  # The methods take turns, so that a slow spell of a shared machine lands on
  # every method alike instead of skewing the ratios. Each turn first runs one
  # untimed step: a step that follows another method's step finds its buffers
  # out of cache and ran about 10% slower, which narrowed the ratios; training
  # never runs that way.
  times = {method: [] for method in runners}
  keys = list(runners)
  for i in range(args.repeats):
    for method in turn_order(keys, i):
      runner = runners[method]
      jax.block_until_ready(runner.step())
      t0 = time.perf_counter()
      jax.block_until_ready(runner.step())
      times[method].append(time.perf_counter() - t0)
  rows = []
  for (model, method), samples in times.items():
    seconds = statistics.median(samples)
    rows.append({"bench": "step", "method": method, "model": model,
                 "batch_size": args.batch_size, "step_ms": seconds * 1e3,
                 "min_step_ms": min(samples) * 1e3,
                 "images_per_s": args.batch_size / seconds,
                 "repeats": args.repeats,
                 "round_ms": [t * 1e3 for t in samples],
                 "device": str(jax.devices()[0].platform)})
  from fractrain_jax import methods

  # The ratios' base: each model's plain full-precision step.
  base = {r["model"]: r for r, runner in zip(rows, runners.values())
          if runner.precision == methods.FP32 and not runner.trainer.gated
          and r["method"] not in VARIANTS}
  first = {r["method"]: r["step_ms"] for r in rows if r["model"] == args.model[0]}
  for r in rows:
    fp32 = base.get(r["model"])
    r["ratio_to_fp32"] = r["step_ms"] / fp32["step_ms"] if fp32 else None
    r["round_ratio_to_fp32"] = (round_ratios(r["round_ms"], fp32["round_ms"]) if fp32
                                else None)
    if len(args.model) > 1:
      r["ratio_to_first_model"] = r["step_ms"] / first[r["method"]] if r["method"] in first else None
  return rows


def bench_profile(args) -> list[dict]:
  """Each method's step by op class (``profile.py``), largest first, with its share."""
  from fractrain_jax.benchmark import profile  # pylint: disable=import-outside-toplevel

  rows = []
  for model in args.model:
    for method in args.methods[model]:
      runner = StepRunner.create(method, model_name=model, batch_size=args.batch_size,
                                 num_classes=args.num_classes, own=args.own.get(model))
      totals = profile.step_profile(runner, steps=args.steps)
      whole = sum(totals.values())
      for label, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        rows.append({"bench": "profile", "model": model, "method": method, "op_class": label,
                     "ms_per_step": ms, "share": ms / whole})
  return rows


def _step_models(parser: argparse.ArgumentParser, args) -> None:
  """Checks ``--model`` (and a model of the user's own's flags); sets ``args.own`` and the
  methods each model times, ``args.methods``."""
  import ast  # pylint: disable=import-outside-toplevel

  from fractrain_jax import attach, models  # pylint: disable=import-outside-toplevel
  from fractrain_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel

  plain = tuple(n for n in models.names() if not n.startswith(models.GATED_PREFIX))
  args.own = {}
  for name in args.model:
    if attach.is_factory(name):
      try:
        options = ast.literal_eval(args.options)
        attach.load(name)
        attach.parse_all(args.quantize)
      except (ValueError, SyntaxError) as err:
        parser.error(f"--model {name}: {err}")
      if not isinstance(options, dict):
        parser.error(f"--options={args.options!r}; expected a Python dict")
      shape = (args.context,) if args.context else (args.image_size, args.image_size, 3)
      args.own[name] = OwnModel(options, tuple(args.blocks), tuple(args.quantize), shape)
    elif name not in plain:
      parser.error(f"--model={name!r}; expected one of {', '.join(plain)} (dfq and frac "
                   "time its gated_ version), or package.module:factory")
  requested, args.methods = args.methods, {}
  try:
    for name in args.model:
      args.methods[name] = timed_methods(requested, name, args.own.get(name))
  except (ValueError, ConfigError) as err:
    parser.error(str(err))


def _add_model_args(p: argparse.ArgumentParser, verb: str, *, several: str, methods_default,
                    methods_help: str) -> None:
  """The models and methods that ``step`` times and ``profile`` profiles, and their data."""
  p.add_argument("--model", nargs="+", default=["resnet38"],
                 help="backbone name, e.g. resnet20/38/74, mobilenet_v2 (default resnet38); "
                      "dfq and frac use its gated_ version; transformer_lm for the LM; or "
                      f"package.module:factory, a model of your own; several are {several}")
  p.add_argument("--options", default="{}",
                 help="a model of your own: the factory's keyword options, a Python dict")
  p.add_argument("--blocks", nargs="*", default=[],
                 help="a model of your own: path patterns of its gated blocks (dfq, frac)")
  p.add_argument("--quantize", nargs="*", default=[],
                 help="a model of your own: quantize rules (default: all but first and last)")
  p.add_argument("--image-size", type=int, default=32,
                 help="a model of your own: the side of its random images (default 32)")
  p.add_argument("--context", type=int, default=0,
                 help=f"a model of your own: {verb} it as a language model of this many tokens")
  p.add_argument("--batch-size", type=int, default=128, help="global batch (default 128)")
  p.add_argument("--num-classes", type=int, default=10,
                 help="classifier width, or the LM's vocabulary (default 10)")
  p.add_argument("--methods", nargs="+", default=methods_default,
                 help=f"methods to {verb}, in turn: fp32, static, pfq, dfq, frac (the "
                      f"registered methods) and the variants {', '.join(VARIANTS)} "
                      + methods_help)


def _text(key: str, value) -> str:
  """``key=value`` for the text output: floats to 3 places, quartiles as ``median[q1,q3]``."""
  if isinstance(value, float):
    return f"{key}={value:.3f}"
  if isinstance(value, dict) and set(value) == {"q1", "median", "q3"}:
    return f"{key}={value['median']:.3f}[{value['q1']:.3f},{value['q3']:.3f}]"
  return f"{key}={value}"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fractrain_jax.benchmark",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="bench", required=True)
  q = sub.add_parser("quant", help="one quantized conv against FP32")
  q.add_argument("--batch-size", type=int, default=128, help="conv input batch (default 128)")
  q.add_argument("--kernels", nargs="+", choices=("xla", "onednn"), default=["xla"],
                 help="the kernels to time it on, in turn (config.train.kernels; default xla)")
  s = sub.add_parser("step", help="one training step per method")
  _add_model_args(s, "time", several="timed in turn and compared with the first",
                  methods_default=None, methods_help=(
      "(default: every one the model runs, but "
      f"{', '.join(NOT_BY_DEFAULT)}); fp32 is the ratios' base"))
  pr = sub.add_parser("profile", help="where one train step spends its time, by op class")
  _add_model_args(pr, "profile", several="profiled in turn", methods_default=["fp32", "dfq"],
                  methods_help="(default fp32 dfq)")
  pr.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
  for p in (q, s):
    p.add_argument("--repeats", type=int, default=10,
                   help="timed repetitions; the median is reported (default 10)")
  for p in (q, s, pr):
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--no-cpu-flags", action="store_true",
                   help=f"do not set XLA_FLAGS={platform.CPU_FLAG} (set on the CPU backend only)")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc as it is (the entry points keep freed memory "
                        "on the CPU backend: run/platform.keep_freed_memory)")
  args = parser.parse_args(argv)
  counts = {"quant": ("batch_size", "repeats"), "step": ("batch_size", "repeats", "num_classes"),
            "profile": ("batch_size", "steps", "num_classes")}[args.bench]
  for name in counts:
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}; expected an int >= 1")
  platform.configure(cpu_flags=not args.no_cpu_flags, malloc=not args.system_malloc)
  if args.bench in ("step", "profile"):
    _step_models(parser, args)
  rows = {"quant": bench_quant, "step": bench_step, "profile": bench_profile}[args.bench](args)
  for r in rows:
    if args.json:
      print(json.dumps(r), flush=True)
    else:
      print("  ".join(_text(k, v) for k, v in r.items() if not isinstance(v, list)),
            flush=True)
  return 0

