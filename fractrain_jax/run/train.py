"""``train_and_evaluate(config, workdir)``: the training loop of every method.

The method (``methods.py``) says what a step runs at and when its stage
rises: fp32 and static train a plain model at one precision; PFQ raises the
precision at each turning point of the loss-plateau indicator (SPEC section
3); DFQ trains the gated model towards a target cp (section 4); FracTrain
raises that target at each turning point (section 5). An optional
full-precision phase follows (``train.finetune_iters``).

The loop runs over ``zip(range(first, total), train_batches)``, the same for
data held on the device and for a stream. Every ``train.eval_every``
iterations it evaluates, appends a line to ``WORKDIR/metrics.jsonl``, writes
TensorBoard scalars and a checkpoint (``checkpoints.py``) that holds
everything needed to continue exactly. Starting again in the same workdir
resumes from the latest checkpoint; an interrupt (Ctrl-C, SIGTERM) saves one
first.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import pathlib
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fractrain_jax import attach, data, dfq, methods, pfq, processes, steps
from fractrain_jax.errors import ConfigError, ResumeError
from fractrain_jax.run import config_check, console, divergence
from fractrain_jax.run import files as run_files
from fractrain_jax.run import summary as run_summary
from fractrain_jax.run import workdir as run_record
from fractrain_jax.run.checkpoints import Checkpoints, Progress, run_identity
from fractrain_jax.run.console import RunLog, Speed, StopRequests, hms
from fractrain_jax.run.setup import RunSetup

log = logging.getLogger(__name__)


class IntervalMetrics:
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


def _setup(config, workdir: pathlib.Path, checkpoints: Checkpoints) -> RunSetup:
  """Data, model, Trainer and the plain model's layers; refuses bad sizes early."""
  n_dev = config.train.num_devices or jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    if config.train[key] % n_dev:
      raise ConfigError(f"config.train.{key}={config.train[key]} must be divisible by the "
                        f"{n_dev} devices")
  method = methods.get(config.method)
  kind = data.find_source(config.data.dataset)
  t0 = time.perf_counter()
  source = kind.load(config)
  log.info("Data: %s, %s, loaded in %.1f s", config.data.dataset, source.describe(),
           time.perf_counter() - t0)
  model = method.create_model(config, source.num_classes, config.seed,
                               input_shape=source.input_shape)
  trainer = steps.Trainer(config, model, mean=source.mean, std=source.std,
                          data_on_device=not kind.streamed)
  if isinstance(model, attach.AttachedModel | attach.GatedAttachedModel):
    log.info("Layers of %s:\n%s", config.model.name, model.describe(trainer.layers))
  # A plain model's own table is the plain reference; capturing it again costs
  # seconds on the deepest models.
  plain_layers = (methods.plain_layer_macs(config, source.num_classes, model)
                  if method.gated else trainer.layers)
  if method.gated:
    method.log_reachable_targets(config)
  return RunSetup(config, method, workdir, source, trainer, plain_layers, checkpoints,
                  run_record.MetricsFile(workdir, write=processes.is_writer()))


def _train_batches(setup: RunSetup, start_step: int) -> Iterator[Any]:
  """One train batch per step, the same iterator shape for both kinds of data.

  On-device data: the whole training set, put on the device once; the step
  picks and augments its own batch. A stream: its batches from ``start_step``
  on, copied to the device ahead of the step that needs them.
  """
  source, trainer = setup.source, setup.trainer
  if trainer.data_on_device:
    return itertools.repeat(trainer.put_replicated(source.train_arrays()))
  c = setup.config
  rows = processes.local_rows(c.train.batch_size)  # This process decodes only its rows.
  return data.prefetch_to_device(
      source.train_batches(c.train.batch_size, seed=c.seed, start_step=start_step, rows=rows),
      trainer.batch_sharding, local=True)


class _EpochOrder:
  """Adds the epoch's permutation to an on-device batch, computed when the epoch changes."""

  def __init__(self, setup: RunSetup):
    self.trainer, self.batch_size = setup.trainer, setup.config.train.batch_size
    self.epoch, self.order = None, None

  def add_to(self, batch, state, step: int):
    inputs, targets = batch
    n = inputs.shape[0]
    epoch = step // data.steps_per_epoch(n, self.batch_size)
    if epoch != self.epoch:  # The state is this step's input: not donated yet.
      self.epoch, self.order = epoch, self.trainer.epoch_order(state, epoch, n)
    return inputs, targets, self.order


def _evaluate(setup: RunSetup, state, precision: methods.Precision) -> dict[str, float]:
  size = setup.config.train.eval_batch_size
  if setup.trainer.data_on_device:  # Whole batches on every host; each feeds its rows.
    return setup.trainer.evaluate(state, setup.source.test_batches(size), precision)
  batches = setup.source.test_batches(size, rows=processes.local_rows(size))
  return setup.trainer.evaluate(state, batches, precision, local=True)


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
  run_record.check_writable(workdir)
  # With several processes, process 0 alone holds the lock and writes the record.
  writer = processes.is_writer()
  made = [f for f in (run_files.CHECKPOINTS, run_files.TENSORBOARD) if not (workdir / f).exists()]
  with run_record.Lock(workdir) if writer else contextlib.nullcontext():
    checkpoints = Checkpoints(workdir, config.checkpoint.keep)
    try:
      # A workdir of another run is refused before anything in it is written.
      checkpoints.check_identity(run_identity(config))
      # A record with no checkpoint is refused rather than replaced by a new start.
      orphan = run_record.record_without_checkpoint(workdir, bool(checkpoints.steps()))
      if processes.agree_any(orphan is not None):  # Every process refuses, or none.
        raise ResumeError(orphan or f"{workdir}: another process found a record without a "
                          "checkpoint")
      with RunLog(workdir) if writer else contextlib.nullcontext():
        return _train(_setup(config, workdir, checkpoints), stop_at)
    finally:
      for folder in made if writer else ():  # A failed start leaves no empty folder it made.
        if (workdir / folder).is_dir() and not any((workdir / folder).iterdir()):
          (workdir / folder).rmdir()


def _train(setup: RunSetup, stop_at: int | None) -> dict[str, Any]:
  """train_and_evaluate once the workdir is known to be this run's."""
  config, trainer, workdir = setup.config, setup.trainer, setup.workdir
  state, progress = setup.checkpoints.restore(trainer.abstract_state())
  summary_path = workdir / run_files.SUMMARY
  if state is not None and int(state.step) >= setup.total_iters:
    return _finished(setup, progress, int(state.step))
  # The record restarts at the restored step: nothing written after it stays.
  setup.metrics.align(0 if state is None else int(state.step),
                      None if progress is None else progress.record)
  if processes.is_writer():
    if summary_path.exists():
      summary_path.unlink()
    run_record.write_json(workdir / run_files.CONFIG, json.loads(config.to_json_best_effort()))
  if state is None:
    state, progress = trainer.init_state(config.seed), Progress(identity=run_identity(config))
    log.info("Starting %s %s in %s", config.method, config.model.name, workdir)
  else:
    state = trainer.put_replicated(state)
    log.info("Resuming %s %s in %s from step %d", config.method, config.model.name, workdir,
             int(state.step))
  first = int(state.step)
  stop_at = setup.total_iters if stop_at is None else min(stop_at, setup.total_iters)
  try:
    state, step, stopped = _loop(setup, progress, state, first, stop_at)
  finally:
    setup.metrics.close()
  if stopped is not None:
    return stopped
  if step < setup.total_iters:  # Stopped by stop_at, after saving a checkpoint.
    log.warning("Stopped at step %d with a checkpoint; run again with the same workdir to "
                "resume", step)
    return {"stopped_at": step}
  summary = _write_summary(setup, progress)
  result = (f"perplexity {summary['final_test_ppl']:.2f} (best {summary['best_test_ppl']:.2f})"
            if "final_test_ppl" in summary else
            f"accuracy {summary['final_test_acc']:.2f}% (best {summary['best_test_acc']:.2f}%)")
  log.info("Done: final test %s, cost %.3g bit-scaled MACs (%.3g of SBM 8/8), wall %s", result,
           summary["total_cost"], summary["total_cost"] / summary["cost_sbm8"],
           hms(summary["wall_s"]))
  return summary


def _finished(setup: RunSetup, progress: Progress, step: int) -> dict[str, Any]:
  """A resume at or past the last iteration: nothing to train; summary.json stays as it is."""
  path, total = setup.workdir / run_files.SUMMARY, setup.total_iters
  if step > total:
    raise ResumeError(
        f"the newest checkpoint in {setup.workdir} is at step {step}, past train.iters + "
        f"train.finetune_iters = {total}: nothing to train (summary.json is left as it is). "
        f"Set train.iters above {step} to train on, or use a new --workdir")
  if path.exists():
    log.info("%s finished at step %d; its summary.json is kept", setup.workdir, step)
    return json.loads(path.read_text())
  # The last checkpoint was committed but a crash lost the summary: write it now.
  setup.metrics.align(step, progress.record)
  setup.metrics.close()
  return _write_summary(setup, progress)


def _write_summary(setup: RunSetup, progress: Progress) -> dict[str, Any]:
  """The run's summary, written to summary.json (by the writing process)."""
  summary = run_summary.summary(setup, progress)
  if processes.is_writer():
    run_record.write_json(setup.workdir / run_files.SUMMARY, summary)
  return summary


def _loop(setup: RunSetup, progress: Progress, state, first: int, stop_at: int):
  """Steps from ``first`` up to ``stop_at``; returns (state, step, early-stop result or None)."""
  config, trainer, method = setup.config, setup.trainer, setup.method
  indicator = pfq.TurningPointIndicator.from_config(config.pfq, progress.indicator)
  interval = IntervalMetrics(progress.interval)
  bs = config.train.batch_size
  t_start, wall_base = time.perf_counter(), progress.wall_s
  speed = Speed(first)
  compiled: set[methods.Precision] = set()
  previous = None  # The last step's metrics, checked while the next step runs.
  step = first
  bar = tqdm.tqdm(total=setup.total_iters, initial=first,
                  desc=f"{config.method} {config.model.name}", dynamic_ncols=True,
                  disable=None if processes.is_writer() else True)
  batches = _train_batches(setup, first)
  order = _EpochOrder(setup) if trainer.data_on_device else None
  # Console log lines go through the bar while it is drawn, so neither overwrites the other.
  with StopRequests() as stop, logging_redirect_tqdm([logging.getLogger("fractrain_jax")]):
    try:
      for step, batch in zip(range(first, stop_at), batches):
        if step == config.train.iters and progress.phase == "train" and config.train.finetune_iters:
          progress.phase = "finetune"
          log.info("Step %d: full-precision fine-tuning for %d iterations", step,
                   config.train.finetune_iters)
        precision = method.step_precision(config, progress.stage, progress.phase)
        target = method.target_cp(config, progress.stage)
        tau = dfq.gumbel_tau(step, config.train.iters, config.dfq.tau_start, config.dfq.tau_end)
        if order is not None:
          batch = order.add_to(batch, state, step)
        t0 = time.perf_counter()
        state, metrics = trainer.train_step(precision)(
            state, batch, jnp.float32(target if target is not None else 0.0), jnp.float32(tau))
        if precision not in compiled:
          jax.block_until_ready(metrics)
          compiled.add(precision)
          log.info("Compiled the %s train step and ran it once in %.1f s", precision,
                   time.perf_counter() - t0)
          speed.restart(step + 1)
        # Cheap every-step check: the previous step's loss terms, fetched while this one runs.
        if previous is not None:
          _check_step(setup, previous, step)  # The step before this one.
        previous = metrics
        interval.add(metrics)
        bar.update(1)
        step += 1
        at_eval = step % config.train.eval_every == 0 or step == setup.total_iters
        flushed = step % config.train.log_every == 0 or at_eval or step == first + 1
        if flushed:
          interval.flush()
          cp = interval.mean("steer_cp") or interval.mean("model_cp")
          bar.set_postfix(loss=f"{interval.mean('ce'):.3f}",
                          acc=f"{100 * interval.mean('correct') / bs:.1f}",
                          cp=f"{cp:.2f}", stage=progress.stage, refresh=False)
          if bar.disable and not at_eval:  # No terminal, no bar: its figures as a log line.
            log.info(console.progress_line(
                step, setup.total_iters, interval.mean("ce"),
                100 * interval.mean("correct") / bs, cp,
                _throughput(setup, speed.per_second(step, bs)), speed.eta(step, setup.total_iters)))
        if at_eval:
          _check_step(setup, metrics, step)
          previous = None  # Checked: the next step need not fetch it again.
          progress.wall_s = wall_base + time.perf_counter() - t_start
          record = _end_interval(setup, progress, indicator, interval, state, step, precision,
                                 target)
          log.info(console.event_line(
              record, setup.total_iters, setup.method.event_parts(record),
              _throughput(setup, speed.per_second(step, bs)), speed.eta(step, setup.total_iters)))
          interval = IntervalMetrics()
        # Several processes stop at one step: they agree where the loop waits for the
        # steps anyway (a signal may have reached only one of them), each process's signal.
        if processes.count() == 1:
          received = [stop.signum or 0]
        else:
          received = processes.gather_ints(stop.signum or 0) if flushed else [0]
        stopping = any(received)
        if not at_eval and (stopping or step == stop_at):
          progress.wall_s = wall_base + time.perf_counter() - t_start
          progress.indicator, progress.interval = indicator.state_dict(), interval.state_dict()
          progress.train_loss = interval.mean("ce")
          setup.checkpoints.save(step, state, progress)
        if stopping:
          # The first process a signal reached; every process exits with its status.
          who, signum = next((i, s) for i, s in enumerate(received) if s)
          log.warning("Stopped at step %d with a checkpoint (%s); run again with the same "
                      "workdir to resume", step, console.signal_text(signum, who, len(received)))
          return state, step, {"stopped_at": step, "signal": signum}
    finally:
      bar.close()
      if hasattr(batches, "close"):  # Stop a stream's prefetch thread reading ahead.
        batches.close()
  return state, step, None


def _check_step(setup: RunSetup, metrics: dict, number: int) -> None:
  """Stops the run at the first step whose loss terms diverged (``divergence.py``)."""
  values = jax.device_get({k: metrics[k] for k in divergence.CHECKED if k in metrics})
  what = divergence.diverged(values, number, setup.source.num_classes)
  if what is not None:
    _stop_diverged(setup, what)


def _stop_diverged(setup: RunSetup, what: str) -> None:
  """Keeps the newest sane checkpoint, cuts the metrics back to it, raises NonFiniteError."""
  ckpt = setup.checkpoints
  step, moved = divergence.keep_sane(ckpt, setup.source.num_classes)
  progress = None if step is None else ckpt.read_meta(step)
  setup.metrics.align(step or 0, None if progress is None else progress.record)
  kept = None if step is None else (step, progress.train_loss)
  raise divergence.error(setup.config, what, kept, moved)


def _throughput(setup: RunSetup, per_second: float | None) -> list[str]:
  """Images per second, or the LM's tokens per second (a sample is a window)."""
  lm = setup.trainer.task == "lm"
  return console.throughput(per_second, setup.config.model.lm.context if lm else None)


def evaluate_checkpoint(config: ml_collections.ConfigDict,
                        workdir: str | pathlib.Path) -> dict[str, Any]:
  """Evaluates the workdir's latest checkpoint at the precision it was training at."""
  config_check.validate(config)
  workdir = pathlib.Path(workdir)
  if not (workdir / run_files.CHECKPOINTS).is_dir():
    raise ResumeError(f"no checkpoints in {workdir / run_files.CHECKPOINTS}: train there first")
  checkpoints = Checkpoints(workdir, config.checkpoint.keep)
  checkpoints.check_identity(run_identity(config))
  setup = _setup(config, workdir, checkpoints)
  state, progress = checkpoints.restore(setup.trainer.abstract_state())
  if state is None:
    raise ResumeError(f"no checkpoint in {workdir / run_files.CHECKPOINTS}: train there first")
  state = setup.trainer.put_replicated(state)
  precision = setup.method.step_precision(config, progress.stage, progress.phase)
  ev = _evaluate(setup, state, precision)
  return {"step": int(state.step), "stage": progress.stage, "phase": progress.phase, **ev}


def _end_interval(setup: RunSetup, progress: Progress, indicator: pfq.TurningPointIndicator,
                  interval: IntervalMetrics, state, step: int, precision: methods.Precision,
                  target: float | None) -> dict[str, Any]:
  """Count the interval's cost, evaluate, log, feed the indicator, checkpoint; returns the record."""
  config, trainer, method = setup.config, setup.trainer, setup.method
  interval.flush()
  samples = interval.steps * config.train.batch_size
  progress.cost = [total + interval.mean(k) * samples
                   for total, k in zip(progress.cost, ("cost_fw", "cost_eb", "cost_gc"))]
  progress.cost_paper += interval.mean("paper_cp") / 100 * trainer.fp32_step_cost * samples
  progress.cost_quantized += interval.mean("cost_quantized") * samples
  progress.model_cp_sum += interval.sums["model_cp"]
  progress.cp_steps += interval.steps
  # Only gated steps have a steering cp (a gated model's fine-tuning has none).
  steer_steps = interval.counts.get("steer_cp", 0)
  progress.steer_cp_sum += interval.sums.get("steer_cp", 0.0)
  progress.steer_cp_steps += steer_steps
  ev = _evaluate(setup, state, precision)
  if not math.isfinite(ev["test_loss"]):
    _stop_diverged(setup, f"test loss became {ev['test_loss']} at step {step}")
  progress.last_test_acc = ev["test_acc"]
  progress.best_test_acc = max(ev["test_acc"], progress.best_test_acc or -1.0)
  progress.last_test_loss = ev["test_loss"]
  progress.best_test_loss = min(ev["test_loss"], progress.best_test_loss or math.inf)
  record = {
      "step": step, "epoch": step / config.train.eval_every, "lr": interval.mean("lr"),
      "train_loss": interval.mean("ce"), "train_cost_term": interval.mean("cost_term"),
      "train_acc": 100.0 * interval.mean("correct") / config.train.batch_size,
      **ev, "stage": progress.stage,
      "fw_bits": precision.bits[0] if precision.bits else None,
      "bw_bits": precision.bits[1] if precision.bits else None,
      "target_cp": target, "steer_cp": interval.mean("steer_cp"),
      "model_cp": interval.mean("model_cp"),
      "cost": sum(progress.cost), "cost_fw": progress.cost[0], "cost_eb": progress.cost[1],
      "cost_gc": progress.cost[2], "cost_paper": progress.cost_paper,
      "cost_quantized": progress.cost_quantized, "wall_s": progress.wall_s,
      "method": config.method, "model": config.model.name, "phase": progress.phase,
  }
  if interval.choice is not None:
    record["choice_ratio"] = (interval.choice / steer_steps).tolist()
    record["candidates"] = [list(config.dfq.fw_candidates), list(config.dfq.bw_candidates)]
  if progress.phase == "train" and method.turning_point(config, step, indicator, record):
    progress.stage += 1
    progress.turning_points.append(step)
    log.info("Turning point at step %d: stage %d%s", step, progress.stage,
             method.turning_point_note(config, progress.stage))
  progress.indicator, progress.interval = indicator.state_dict(), None
  progress.train_loss = record["train_loss"]
  progress.record = record
  # The line follows its checkpoint: a crash in between leaves the line in the checkpoint,
  # and the next start puts it back (MetricsFile.align).
  setup.checkpoints.save(step, state, progress)
  setup.metrics.append(record)
  return record
