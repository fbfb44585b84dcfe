"""``train_and_evaluate(config, workdir)``: the training loop of every method.

fp32 and static train a plain model at one precision; PFQ raises the precision
at each turning point of the loss-plateau indicator (SPEC section 3); DFQ
trains the gated model towards a target cp (section 4); FracTrain raises that
target at each turning point (section 5). An optional full-precision phase
follows (``train.finetune_iters``).

The loop runs over ``zip(range(first, total), train_batches)``, the same for
data held on the device and for a stream. Every ``train.eval_every``
iterations it evaluates, appends a line to ``WORKDIR/metrics.jsonl``, writes
TensorBoard scalars and an Orbax checkpoint that holds everything needed to
continue exactly: the arrays (``steps.TrainState``) and the run's bookkeeping
(``RunState``). Starting again in the same workdir resumes from the latest
checkpoint; an interrupt (Ctrl-C, SIGTERM) saves one first.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fractrain_jax import config_check, cost, data, dfq, models, pfq, run_files, steps
from fractrain_jax.report import hms
from fractrain_jax.summary import TensorBoardWriter
from fractrain_jax.errors import ConfigError, NonFiniteError, ResumeError

log = logging.getLogger(__name__)


class Interval:
  """Host-side sums of the step metrics since the last evaluation.

  Steps hand in their metrics as device arrays; they are fetched in one
  transfer at ``flush``, so the host never waits on a step in between.
  """

  def __init__(self, d: dict | None = None):
    d = d or {}
    self.steps = d.get("steps", 0)
    self.sums: dict[str, float] = d.get("sums", {})
    self.counts: dict[str, int] = d.get("counts", {})  # Steps that reported each key.
    self.choice = None if d.get("choice") is None else np.asarray(d["choice"])
    self.pending: list[dict] = []

  def add(self, metrics: dict) -> None:
    self.pending.append(metrics)

  def flush(self) -> None:
    for m in jax.device_get(self.pending):
      self.steps += 1
      for k, v in m.items():
        if k == "choice":
          self.choice = v if self.choice is None else self.choice + v
        else:
          self.sums[k] = self.sums.get(k, 0.0) + float(v)
          self.counts[k] = self.counts.get(k, 0) + 1
    self.pending = []

  def mean(self, k: str) -> float | None:
    """Mean over the steps that reported ``k``; None when none did."""
    n = self.counts.get(k, 0)
    return self.sums[k] / n if n else None

  def state_dict(self) -> dict:
    self.flush()
    return {"steps": self.steps, "sums": self.sums, "counts": self.counts,
            "choice": None if self.choice is None else self.choice.tolist()}


@dataclasses.dataclass
class RunState:
  """Everything a checkpoint holds besides the arrays: where the run is and what it has counted.

  JSON-serializable, saved beside ``steps.TrainState`` in every checkpoint.
  """
  phase: str = "train"                  # "train", then "finetune" after train.iters.
  stage: int = 0                        # PFQ stage / FracTrain target index.
  indicator: dict | None = None         # pfq.TurningPointIndicator.state_dict().
  cost: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])  # FW, EB, GC.
  cost_paper: float = 0.0               # The paper's convention: cp x FP32 cost.
  cost_quantized: float = 0.0           # The quantized layers' cost alone.
  turning_points: list[int] = dataclasses.field(default_factory=list)
  best_test_acc: float | None = None
  last_test_acc: float | None = None
  best_test_loss: float | None = None   # The LM's perplexity is exp of these.
  last_test_loss: float | None = None
  wall_s: float = 0.0
  model_cp_sum: float = 0.0             # Sums of per-step cp, for the run's means.
  cp_steps: int = 0
  steer_cp_sum: float = 0.0
  steer_cp_steps: int = 0
  interval: dict | None = None          # Interval.state_dict() of an unfinished interval.
  identity: dict | None = None          # What the run is (run_identity); resuming checks it.
  train_loss: float | None = None       # Mean training loss of the steps before this save.

  @classmethod
  def from_dict(cls, d: dict) -> "RunState":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"checkpoint bookkeeping has unknown keys {sorted(unknown)}; it was "
                       "written by another version of fractrain-jax")
    return cls(**d)


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint belongs to: the settings that make two runs different runs.

  Resuming under a config that differs here would mix two runs' metrics and
  costs; everything else (iters, eval_every, log_every, ...) may change.
  """
  identity = {"method": config.method, "model": config.model.name,
              "dataset": config.data.dataset}
  if config.model.name == models.LM:  # Its shape, and which split trains.
    identity["lm"] = steps.model_options(config)
    identity["splits"] = [config.data.text_train, config.data.text_test]
  if config.method == "static":
    identity["bits"] = [config.quant.fw_bits, config.quant.bw_bits]
  if config.method == "pfq":
    identity["schedule"] = [list(config.pfq.fw_schedule), list(config.pfq.bw_schedule)]
  if config.method in steps.GATED_METHODS:
    d = config.dfq
    identity["candidates"] = [list(d.fw_candidates), list(d.bw_candidates), d.weight_bits]
    # Only where they differ from the defaults, so checkpoints written before
    # these options existed still match.
    if d.forward != "single":
      identity["forward"] = d.forward
    if d.gate_head != "auto":
      identity["gate_head"] = d.gate_head
  return identity


def _one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class Checkpoints:
  """The workdir's Orbax checkpoints: a ``TrainState`` and a ``RunState`` per saved step.

  A checkpoint that does not restore (a truncated array file, missing
  metadata) is moved aside into ``checkpoints_bad/`` (never deleted) and the
  next older one is tried.
  """

  def __init__(self, workdir: pathlib.Path, keep: int):
    self.workdir = workdir
    self.keep = keep
    self.directory = (workdir / run_files.CHECKPOINTS).absolute()
    self._open()

  def _open(self) -> None:
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True))

  def save(self, step: int, state: steps.TrainState, run: RunState) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dataclasses.asdict(run))),
                      force=True)
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps(), reverse=True)

  def read_meta(self, step: int) -> RunState:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return RunState.from_dict(out["meta"])

  def move_aside(self, step: int, why: str) -> pathlib.Path:
    """Renames checkpoint ``step`` into ``checkpoints_bad/`` and reopens the manager."""
    bad_root = self.workdir / (run_files.CHECKPOINTS + "_bad")
    bad_root.mkdir(exist_ok=True)
    target = bad_root / f"{step}-{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    self.manager.close()  # Its view of the steps is stale once a folder moves.
    shutil.move(str(self.directory / str(step)), str(target))
    self._open()
    return target

  def check_identity(self, identity: dict) -> None:
    """Refuses (ResumeError) a workdir whose newest readable checkpoint is of another run.

    Reads only the small JSON part, so it answers before any data is loaded
    and before anything in the workdir is written.
    """
    for step in self.steps():
      try:
        run = self.read_meta(step)
      except Exception:  # pylint: disable=broad-except
        continue  # restore() will move it aside and say so.
      if run.identity is not None and run.identity != identity:
        raise ResumeError(
            f"{self.workdir} holds a checkpoint of another run ({_describe(run.identity)}); "
            f"this config is {_describe(identity)}. Use another --workdir, or the first "
            "run's settings to resume it")
      return

  def restore(self, abstract_state) -> tuple[steps.TrainState | None, RunState | None]:
    """The newest checkpoint that restores, with its RunState; (None, None) when there is none."""
    for step in self.steps():
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], RunState.from_dict(out["meta"])
      except Exception as err:  # pylint: disable=broad-except
        moved = self.move_aside(step, "unreadable")
        log.warning("Checkpoint of step %d could not be restored (%s); moved it to %s and "
                    "trying the previous one", step, _one_line(err), moved)
    return None, None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()


def _describe(identity: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in identity.items())


@dataclasses.dataclass
class Session:
  """What the loop works with, fixed for the whole run."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  source: Any                       # data.ArrayData or data.StreamData.
  trainer: steps.Trainer
  plain_layers: list[cost.LayerMACs]  # The plain backbone: FP32 and SBM references.
  checkpoints: Checkpoints
  tensorboard: Any = None

  @property
  def total_iters(self) -> int:
    return self.config.train.iters + self.config.train.finetune_iters


def _make_indicator(config, state_dict: dict | None) -> pfq.TurningPointIndicator:
  if state_dict is not None:
    return pfq.TurningPointIndicator.from_state_dict(state_dict)
  p = config.pfq
  return pfq.TurningPointIndicator(eps=p.eps, alpha=p.alpha,
                                   num_turning_points=p.num_turning_points,
                                   window=p.window, scale_epochs=p.scale_epochs)


def _uses_indicator(method: str) -> bool:
  return method in ("pfq", "frac")


def _target_cp(config, stage: int) -> float | None:
  if config.method == "dfq":
    return float(config.dfq.target_cp)
  if config.method == "frac":
    return float(dfq.frac_target(stage, config.dfq.target_cp, config.dfq.target_step))
  return None


def _targets(config) -> list[float]:
  """Every target cp the run will steer to: DFQ's one, or FracTrain's per stage."""
  if config.method == "dfq":
    return [float(config.dfq.target_cp)]
  return [_target_cp(config, i) for i in range(config.pfq.num_turning_points + 1)]


def _check_targets_reachable(config) -> None:
  """Logs the reachable steering-cp range; warns about a target outside it.

  Not a refusal: the README's FracTrain recipe starts at 1.5, below the 1.758
  floor of the CIFAR candidates, in the authors' code too. Below the floor the
  cost term only pushes down (sign +1 at every step), above the ceiling only up.
  """
  d = config.dfq
  lo, hi = cost.steer_cp_range(d.fw_candidates, d.bw_candidates, d.weight_bits)
  log.info("Steering cp of gated %s with these candidates: %.3f%% (every block at the "
           "cheapest) to %.3f%% (every block at the dearest)", config.model.name, lo, hi)
  outside = [t for t in _targets(config) if not lo <= t <= hi]
  if outside:
    log.warning("target cp %s outside the reachable steering-cp range %.3f-%.3f%% of these "
                "candidates (fw %s, bw %s, weights %d bits): the gate cannot meet it",
                ", ".join(f"{t:g}" for t in outside), lo, hi, tuple(d.fw_candidates),
                tuple(d.bw_candidates), d.weight_bits)


def _setup(config) -> tuple[Any, steps.Trainer, list[cost.LayerMACs]]:
  """Data source, Trainer and the plain backbone's layers; refuses bad sizes early."""
  n_dev = config.train.num_devices or jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    if config.train[key] % n_dev:
      raise ConfigError(f"config.train.{key}={config.train[key]} must be divisible by the "
                        f"{n_dev} devices")
  streamed = data.is_streamed(config.data.dataset)
  t0 = time.perf_counter()
  if data.is_text(config.data.dataset):
    source = data.load_text(config.data.dataset, context=config.model.lm.context,
                            train_split=config.data.text_train,
                            test_split=config.data.text_test,
                            train_subset=config.data.train_subset,
                            test_subset=config.data.test_subset)
    if source.num_train < config.train.batch_size:
      raise ConfigError(f"config.train.batch_size={config.train.batch_size} exceeds the "
                        f"{source.num_train} training windows of {source.context} tokens")
    log.info("Data: %s, %s split (%d tokens, %d windows of %d) trains, %s split (%d tokens) "
             "tests, vocabulary %d, loaded in %.1f s", config.data.dataset,
             config.data.text_train, len(source.train_tokens), source.num_train,
             source.context, config.data.text_test, len(source.test_tokens),
             source.num_classes, time.perf_counter() - t0)
  elif streamed:
    source = data.StreamData(config.data.dataset, data_dir=config.data.data_dir,
                             download=config.data.download, image_size=config.data.image_size)
    log.info("Data: %s streamed through tf.data, %d classes", config.data.dataset,
             source.num_classes)
  else:
    source = data.load_arrays(config.data.dataset, data_dir=config.data.data_dir,
                              download=config.data.download,
                              train_subset=config.data.train_subset,
                              test_subset=config.data.test_subset, seed=config.seed)
    if len(source.train_images) < config.train.batch_size:
      raise ConfigError(f"config.train.batch_size={config.train.batch_size} exceeds the "
                        f"{len(source.train_images)} training images")
    log.info("Data: %s, %d training and %d test images of %dx%d, %d classes, loaded in %.1f s",
             config.data.dataset, source.num_train, source.num_test,
             source.train_images.shape[1], source.train_images.shape[2], source.num_classes,
             time.perf_counter() - t0)
  model = steps.create_model(config, source.num_classes, config.seed)
  trainer = steps.Trainer(config, model, mean=source.mean, std=source.std,
                          data_on_device=not streamed)
  # A plain model's own table is the plain reference; capturing it again costs
  # seconds on the deepest models.
  plain_layers = (steps.plain_layer_macs(config, source.num_classes) if trainer.gated
                  else trainer.layers)
  return source, trainer, plain_layers


def _train_batches(session: Session, start_step: int) -> Iterator[Any]:
  """One train batch per step, the same iterator shape for both kinds of data.

  On-device data: the whole training set, put on the device once; the step
  picks and augments its own batch. A stream: its batches from ``start_step``
  on, copied to the device ahead of the step that needs them.
  """
  source, trainer = session.source, session.trainer
  if trainer.data_on_device:
    return itertools.repeat(trainer.put_replicated(source.train_arrays()))
  c = session.config
  return data.prefetch_to_device(
      source.train_batches(c.train.batch_size, seed=c.seed, start_step=start_step),
      trainer.batch_sharding)


def _evaluate(session: Session, state, precision: steps.Precision) -> dict[str, float]:
  batches = session.source.test_batches(session.config.train.eval_batch_size)
  return session.trainer.evaluate(state, batches, precision)


class _StopRequests:
  """SIGINT/SIGTERM handling while the loop runs.

  The first signal only sets ``signum``: the loop finishes the step in flight,
  saves a checkpoint and stops (a KeyboardInterrupt raised inside a step would
  leave its donated input state deleted, with nothing to save). A second
  Ctrl-C leaves the process at once with exit status 130, from the last
  checkpoint: raising inside a compile or a running step is what crashed it.
  """

  def __init__(self):
    self.signum: int | None = None
    self._old: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _on_signal(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      log.warning("Second Ctrl-C: stopping now; the newest checkpoint is kept")
      logging.shutdown()
      os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access
    log.warning("Signal %d: saving a checkpoint after this step, then stopping "
                "(Ctrl-C again to stop at once)", signum)
    self.signum = signum

  def __enter__(self) -> "_StopRequests":
    if threading.current_thread() is threading.main_thread():
      self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)


class _RunLog:
  """A copy of this package's log lines in WORKDIR/log.txt while the run lasts."""

  def __init__(self, workdir: pathlib.Path):
    self.handler = logging.FileHandler(workdir / run_files.LOG, encoding="utf-8")
    self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                                "%Y-%m-%d %H:%M:%S"))
    self.handler.setLevel(logging.INFO)
    self.logger = logging.getLogger("fractrain_jax")

  def __enter__(self) -> "_RunLog":
    self.logger.addHandler(self.handler)
    if self.logger.getEffectiveLevel() > logging.INFO:
      self.logger.setLevel(logging.INFO)
    return self

  def __exit__(self, *exc) -> None:
    self.logger.removeHandler(self.handler)
    self.handler.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       stop_at: int | None = None) -> dict[str, Any]:
  """Trains and evaluates one run; returns the summary (also written to summary.json).

  stop_at: stop after this many iterations as if interrupted (checkpoint saved,
  no summary), for tests and for splitting a run into jobs. A run stopped
  early returns ``{"stopped_at": step}``, plus ``"signal"`` when a signal
  stopped it.
  """
  config_check.validate(config)
  workdir = config_check.check_workdir(workdir)
  checkpoints = Checkpoints(workdir, config.checkpoint.keep)
  # A workdir of another run is refused before anything in it is written.
  checkpoints.check_identity(run_identity(config))
  with _RunLog(workdir):
    return _train(config, workdir, checkpoints, stop_at)


def _train(config, workdir: pathlib.Path, checkpoints: "Checkpoints",
           stop_at: int | None) -> dict[str, Any]:
  """train_and_evaluate once the workdir is known to be this run's."""
  source, trainer, plain_layers = _setup(config)
  if trainer.gated:
    _check_targets_reachable(config)
  session = Session(config, workdir, source, trainer, plain_layers, checkpoints)
  state, run = checkpoints.restore(trainer.abstract_state())
  (workdir / run_files.CONFIG).write_text(config.to_json_best_effort(indent=2) + "\n")
  if state is None:
    state, run = trainer.init_state(config.seed), RunState(identity=run_identity(config))
    log.info("Starting %s %s in %s", config.method, config.model.name, workdir)
  else:
    state = trainer.put_replicated(state)
    log.info("Resuming %s %s in %s from step %d", config.method, config.model.name, workdir,
             int(state.step))
  session.tensorboard = TensorBoardWriter(workdir / run_files.TENSORBOARD)
  first = int(state.step)
  stop_at = session.total_iters if stop_at is None else min(stop_at, session.total_iters)
  try:
    state, step, stopped = _loop(session, run, state, first, stop_at)
  finally:
    session.tensorboard.close()
  if stopped is not None:
    return stopped
  if step < session.total_iters:  # Stopped by stop_at, after saving a checkpoint.
    log.warning("Stopped at step %d with a checkpoint; run again with the same workdir to "
                "resume", step)
    return {"stopped_at": step}
  summary = _summary(session, run)
  (workdir / run_files.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
  result = (f"perplexity {summary['final_test_ppl']:.2f} (best {summary['best_test_ppl']:.2f})"
            if "final_test_ppl" in summary else
            f"accuracy {summary['final_test_acc']:.2f}% (best {summary['best_test_acc']:.2f}%)")
  log.info("Done: final test %s, cost %.3g bit-scaled MACs (%.3g of SBM 8/8), wall %s", result,
           summary["total_cost"], summary["total_cost"] / summary["cost_sbm8"],
           hms(summary["wall_s"]))
  return summary


def _loop(session: Session, run: RunState, state, first: int, stop_at: int):
  """Steps from ``first`` up to ``stop_at``; returns (state, step, early-stop result or None)."""
  config, trainer = session.config, session.trainer
  indicator = _make_indicator(config, run.indicator)
  interval = Interval(run.interval)
  bs = config.train.batch_size
  t_start, wall_base = time.perf_counter(), run.wall_s
  speed = _Speed(first)
  compiled: set[steps.Precision] = set()
  previous = None  # The last step's metrics, checked while the next step runs.
  step = first
  bar = tqdm.tqdm(total=session.total_iters, initial=first,
                  desc=f"{config.method} {config.model.name}", dynamic_ncols=True, disable=None)
  batches = _train_batches(session, first)
  # Console log lines go through the bar while it is drawn, so neither overwrites the other.
  with _StopRequests() as stop, logging_redirect_tqdm([logging.getLogger("fractrain_jax")]):
    try:
      for step, batch in zip(range(first, stop_at), batches):
        if step == config.train.iters and run.phase == "train" and config.train.finetune_iters:
          run.phase = "finetune"
          log.info("Step %d: full-precision fine-tuning for %d iterations", step,
                   config.train.finetune_iters)
        precision = steps.precision_for(config, run.stage, run.phase)
        target = _target_cp(config, run.stage)
        tau = dfq.gumbel_tau(step, config.train.iters, config.dfq.tau_start, config.dfq.tau_end)
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(precision)(
            state, batch, jnp.float32(target if target is not None else 0.0), jnp.float32(tau))
        if precision not in compiled:
          jax.block_until_ready(metrics)
          compiled.add(precision)
          log.info("Compiled the %s train step and ran it once in %.1f s", precision,
                   time.perf_counter() - t0)
          speed.restart(step + 1)
        # Cheap every-step check: the previous step's loss, fetched while this one runs.
        if previous is not None:
          _check_finite_step(session, previous, step)  # The step before this one.
        previous = metrics
        interval.add(metrics)
        bar.update(1)
        step += 1
        at_eval = step % config.train.eval_every == 0 or step == session.total_iters
        if step % config.train.log_every == 0 or at_eval or step == first + 1:
          interval.flush()
          cp = interval.mean("steer_cp") or interval.mean("model_cp")
          bar.set_postfix(loss=f"{interval.mean('ce'):.3f}",
                          acc=f"{100 * interval.mean('correct') / bs:.1f}",
                          cp=f"{cp:.2f}", stage=run.stage, refresh=False)
        if at_eval:
          _check_finite_step(session, metrics, step)
          previous = None  # Checked: the next step need not fetch it again.
          run.wall_s = wall_base + time.perf_counter() - t_start
          record = _end_interval(session, run, indicator, interval, state, step, precision,
                                 target)
          log.info(_event_line(session, record, speed.images_per_s(step, bs),
                               speed.eta(step, session.total_iters)))
          interval = Interval()
        elif stop.requested or step == stop_at:
          run.wall_s = wall_base + time.perf_counter() - t_start
          run.indicator, run.interval = indicator.state_dict(), interval.state_dict()
          run.train_loss = interval.mean("ce")
          session.checkpoints.save(step, state, run)
        if stop.requested:
          log.warning("Stopped at step %d with a checkpoint (signal %d); run again with the "
                      "same workdir to resume", step, stop.signum)
          return state, step, {"stopped_at": step, "signal": stop.signum}
    finally:
      bar.close()
      if hasattr(batches, "close"):  # Stop a stream's prefetch thread reading ahead.
        batches.close()
  return state, step, None


class _Speed:
  """Images per second and the time left, measured from the first compiled step on."""

  def __init__(self, step: int):
    self.restart(step)

  def restart(self, step: int) -> None:
    self.step0, self.t0 = step, time.perf_counter()

  def images_per_s(self, step: int, batch_size: int) -> float | None:
    dt = time.perf_counter() - self.t0
    return (step - self.step0) * batch_size / dt if dt > 0 and step > self.step0 else None

  def eta(self, step: int, total: int) -> str:
    dt = time.perf_counter() - self.t0
    if step <= self.step0 or dt <= 0:
      return "?"
    return hms((total - step) * dt / (step - self.step0))


def _event_line(session: Session, record: dict, images_per_s: float | None, eta: str) -> str:
  """One evaluation as one console line (also in log.txt)."""
  config = session.config
  parts = [f"step {record['step']}/{session.total_iters}",
           f"train loss {record['train_loss']:.3f} acc {record['train_acc']:.1f}%",
           f"test loss {record['test_loss']:.3f} acc {record['test_acc']:.2f}%"
           + (f" ppl {record['test_ppl']:.2f}" if "test_ppl" in record else "")]
  if record.get("steer_cp") is not None:
    parts.append(f"steer cp {record['steer_cp']:.2f}% (target {record['target_cp']:g}%)")
  parts.append(f"model cp {record['model_cp']:.2f}%")
  if record.get("fw_bits") is not None:
    parts.append(f"stage {record['stage']} ({record['fw_bits']}/{record['bw_bits']} bits)")
  elif config.method == "frac":
    parts.append(f"stage {record['stage']}")
  if record["phase"] != "train":
    parts.append(record["phase"])
  if images_per_s is not None:
    if session.trainer.task == "lm":  # A sample is a window of context tokens.
      parts.append(f"{images_per_s * config.model.lm.context:.0f} tokens/s")
    else:
      parts.append(f"{images_per_s:.0f} img/s")
  parts.append(f"ETA {eta}")
  return " | ".join(parts)


def _absurd_loss(session: Session) -> float:
  """A cross-entropy far beyond any a model that learns reports: 100x that of a uniform guess."""
  return 100 * math.log(max(session.source.num_classes, 2))


def _check_finite_step(session: Session, metrics: dict, number: int) -> None:
  """Stops the run at the first step whose training loss is nan or inf (``number``: 1-based)."""
  loss = float(jax.device_get(metrics["ce"]))
  if math.isfinite(loss):
    return
  _stop_diverged(session, f"training loss became {loss} at step {number}")


def _stop_diverged(session: Session, what: str) -> None:
  """Keeps the newest checkpoint whose training loss was finite and not absurd; raises."""
  c, ckpt = session.config, session.checkpoints
  bound = _absurd_loss(session)
  kept, moved = None, []
  for step in ckpt.steps():
    loss = ckpt.read_meta(step).train_loss
    if loss is not None and math.isfinite(loss) and loss <= bound:
      kept = (step, loss)
      break
    ckpt.move_aside(step, "diverged")
    moved.append(f"{step} (training loss {loss:.3g})" if loss is not None else str(step))
  where = (f"kept the checkpoint of step {kept[0]} (training loss {kept[1]:.3g})" if kept
           else "no checkpoint before it had a sane training loss")
  aside = f"; moved aside step {', '.join(moved)} to {run_files.CHECKPOINTS}_bad/" if moved else ""
  again = "resume from that checkpoint" if kept else "start over"
  raise NonFiniteError(
      f"{what} ({c.method}, {c.model.name}, lr {c.optim.lr:g}); {where}{aside}. Lower "
      f"optim.lr or check the data, then run again to {again}")


def evaluate_checkpoint(config: ml_collections.ConfigDict,
                        workdir: str | pathlib.Path) -> dict[str, Any]:
  """Evaluates the workdir's latest checkpoint at the precision it was training at."""
  config_check.validate(config)
  workdir = pathlib.Path(workdir)
  if not (workdir / run_files.CHECKPOINTS).is_dir():
    raise ResumeError(f"no checkpoints in {workdir / run_files.CHECKPOINTS}: train there first")
  checkpoints = Checkpoints(workdir, config.checkpoint.keep)
  checkpoints.check_identity(run_identity(config))
  source, trainer, plain_layers = _setup(config)
  session = Session(config, workdir, source, trainer, plain_layers, checkpoints)
  state, run = checkpoints.restore(trainer.abstract_state())
  if state is None:
    raise ResumeError(f"no checkpoint in {workdir / run_files.CHECKPOINTS} restores")
  state = trainer.put_replicated(state)
  ev = _evaluate(session, state, steps.precision_for(config, run.stage, run.phase))
  return {"step": int(state.step), "stage": run.stage, "phase": run.phase, **ev}


def _end_interval(session: Session, run: RunState, indicator: pfq.TurningPointIndicator,
                  interval: Interval, state, step: int, precision: steps.Precision,
                  target: float | None) -> dict[str, Any]:
  """Count the interval's cost, evaluate, log, feed the indicator, checkpoint; returns the record."""
  config, trainer = session.config, session.trainer
  interval.flush()
  samples = interval.steps * config.train.batch_size
  run.cost = [total + interval.mean(k) * samples
              for total, k in zip(run.cost, ("cost_fw", "cost_eb", "cost_gc"))]
  run.cost_paper += interval.mean("paper_cp") / 100 * trainer.fp32_step_cost * samples
  run.cost_quantized += interval.mean("cost_quantized") * samples
  run.model_cp_sum += interval.sums["model_cp"]
  run.cp_steps += interval.steps
  # Only gated steps have a steering cp (a gated model's fine-tuning has none).
  steer_steps = interval.counts.get("steer_cp", 0)
  run.steer_cp_sum += interval.sums.get("steer_cp", 0.0)
  run.steer_cp_steps += steer_steps
  ev = _evaluate(session, state, precision)
  if not math.isfinite(ev["test_loss"]):
    _stop_diverged(session, f"test loss became {ev['test_loss']} at step {step}")
  run.last_test_acc = ev["test_acc"]
  run.best_test_acc = max(ev["test_acc"], run.best_test_acc or -1.0)
  run.last_test_loss = ev["test_loss"]
  run.best_test_loss = min(ev["test_loss"], run.best_test_loss or math.inf)
  record = {
      "step": step, "epoch": step / config.train.eval_every, "lr": interval.mean("lr"),
      "train_loss": interval.mean("ce"), "train_cost_term": interval.mean("cost_term"),
      "train_acc": 100.0 * interval.mean("correct") / config.train.batch_size,
      **ev, "stage": run.stage,
      "fw_bits": precision.bits[0] if precision.bits else None,
      "bw_bits": precision.bits[1] if precision.bits else None,
      "target_cp": target, "steer_cp": interval.mean("steer_cp"),
      "model_cp": interval.mean("model_cp"),
      "cost": sum(run.cost), "cost_fw": run.cost[0], "cost_eb": run.cost[1],
      "cost_gc": run.cost[2], "cost_paper": run.cost_paper,
      "cost_quantized": run.cost_quantized, "wall_s": run.wall_s,
      "method": config.method, "model": config.model.name, "phase": run.phase,
  }
  if interval.choice is not None:
    record["choice_ratio"] = (interval.choice / steer_steps).tolist()
    record["candidates"] = [list(config.dfq.fw_candidates), list(config.dfq.bw_candidates)]
  with open(session.workdir / run_files.METRICS, "a") as f:
    f.write(json.dumps(record) + "\n")
  session.tensorboard.write(step, {k: v for k, v in record.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
  # The indicator reads this interval's mean training loss (Alg. 1's epoch loss),
  # FracTrain's with the signed cost term in it, as the authors' script feeds it
  # (train_frac.py:447,454); PFQ's term is 0.
  if (_uses_indicator(config.method) and run.phase == "train"
      and indicator.update(record["train_loss"] + record["train_cost_term"])):
    run.stage = indicator.stage
    run.turning_points.append(step)
    log.info("Turning point at step %d: stage %d%s", step, indicator.stage,
             f", target cp {_target_cp(config, run.stage):g}%" if config.method == "frac" else
             f", {steps.precision_for(config, run.stage)}" if config.method == "pfq" else "")
  run.indicator, run.interval = indicator.state_dict(), None
  run.train_loss = record["train_loss"]
  session.checkpoints.save(step, state, run)
  return record


def _summary(session: Session, run: RunState) -> dict[str, Any]:
  """The run's results; an LM's adds its test loss and perplexity (final and best)."""
  config = session.config
  samples = session.total_iters * config.train.batch_size
  lm = {}
  if session.trainer.task == "lm":
    lm = {"final_test_loss": run.last_test_loss, "best_test_loss": run.best_test_loss,
          "final_test_ppl": steps.perplexity(run.last_test_loss),
          "best_test_ppl": steps.perplexity(run.best_test_loss)}
  return {**lm,
      "method": config.method, "model": config.model.name, "dataset": config.data.dataset,
      "iters": session.total_iters, "final_test_acc": run.last_test_acc,
      "best_test_acc": run.best_test_acc, "total_cost": sum(run.cost),
      "cost_fw": run.cost[0], "cost_eb": run.cost[1], "cost_gc": run.cost[2],
      "cost_paper": run.cost_paper,
      "cost_fp32": cost.fp32_cost(session.plain_layers).total * samples,
      "cost_sbm8": cost.static_cost(session.plain_layers, (8, 8)).total * samples,
      # The layers this run quantizes, alone, and the same layers at SBM 8/8.
      "cost_quantized": run.cost_quantized,
      "cost_quantized_sbm8": (cost.sbm8_quantized_cost(session.trainer.layers).total
                              * samples),
      "mean_model_cp": run.model_cp_sum / max(run.cp_steps, 1),
      "mean_steer_cp": run.steer_cp_sum / run.steer_cp_steps if run.steer_cp_steps else None,
      "turning_points": run.turning_points, "wall_s": run.wall_s,
  }
