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
import pathlib
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

from fractrain_jax import config_check, cost, data, dfq, pfq, run_files, steps

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
  cost_paper: float = 0.0               # The paper's convention: steering cp x FP32 cost.
  turning_points: list[int] = dataclasses.field(default_factory=list)
  best_test_acc: float | None = None
  last_test_acc: float | None = None
  wall_s: float = 0.0
  model_cp_sum: float = 0.0             # Sums of per-step cp, for the run's means.
  cp_steps: int = 0
  steer_cp_sum: float = 0.0
  steer_cp_steps: int = 0
  interval: dict | None = None          # Interval.state_dict() of an unfinished interval.

  @classmethod
  def from_dict(cls, d: dict) -> "RunState":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"checkpoint bookkeeping has unknown keys {sorted(unknown)}; it was "
                       "written by another version of fractrain-jax")
    return cls(**d)


class Checkpoints:
  """The workdir's Orbax checkpoints: a ``TrainState`` and a ``RunState`` per saved step."""

  def __init__(self, workdir: pathlib.Path, keep: int):
    self.manager = ocp.CheckpointManager(
        (workdir / run_files.CHECKPOINTS).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, step: int, state: steps.TrainState, run: RunState) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dataclasses.asdict(run))),
                      force=True)
    self.manager.wait_until_finished()

  def restore(self, abstract_state) -> tuple[steps.TrainState | None, RunState | None]:
    step = self.manager.latest_step()
    if step is None:
      return None, None
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], RunState.from_dict(out["meta"])

  def latest_step(self) -> int | None:
    return self.manager.latest_step()


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


class _TensorBoard:
  """TensorBoard scalars through tf.summary (TensorFlow is already a dependency)."""

  def __init__(self, logdir: pathlib.Path):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], "GPU")
    self._tf = tf
    self._writer = tf.summary.create_file_writer(str(logdir))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    with self._writer.as_default():
      for k, v in scalars.items():
        self._tf.summary.scalar(k, v, step=step)
    self._writer.flush()


def _setup(config) -> tuple[Any, steps.Trainer, list[cost.LayerMACs]]:
  """Data source, Trainer and the plain backbone's layers; refuses bad sizes early."""
  n_dev = config.train.num_devices or jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    if config.train[key] % n_dev:
      raise ValueError(f"train.{key}={config.train[key]} must be divisible by the "
                       f"{n_dev} devices")
  streamed = data.is_streamed(config.data.dataset)
  if streamed:
    source = data.StreamData(config.data.dataset, data_dir=config.data.data_dir,
                             download=config.data.download, image_size=config.data.image_size)
  else:
    source = data.load_arrays(config.data.dataset, data_dir=config.data.data_dir,
                              download=config.data.download,
                              train_subset=config.data.train_subset,
                              test_subset=config.data.test_subset, seed=config.seed)
    if len(source.train_images) < config.train.batch_size:
      raise ValueError(f"train.batch_size={config.train.batch_size} exceeds the "
                       f"{len(source.train_images)} training images")
  model = steps.create_model(config, source.num_classes, config.seed)
  trainer = steps.Trainer(config, model, mean=source.mean, std=source.std,
                          data_on_device=not streamed)
  return source, trainer, steps.plain_layer_macs(config, source.num_classes)


def _train_batches(session: Session, start_step: int) -> Iterator[Any]:
  """One train batch per step, the same iterator shape for both kinds of data.

  On-device data: the whole training set, put on the device once; the step
  picks and augments its own batch. A stream: its batches from ``start_step``
  on, copied to the device ahead of the step that needs them.
  """
  source, trainer = session.source, session.trainer
  if trainer.data_on_device:
    return itertools.repeat(trainer.put_replicated((source.train_images, source.train_labels)))
  c = session.config
  return data.prefetch_to_device(
      source.train_batches(c.train.batch_size, seed=c.seed, start_step=start_step),
      trainer.batch_sharding)


def _evaluate(session: Session, state, precision: steps.Precision) -> dict[str, float]:
  batches = session.source.test_batches(session.config.train.eval_batch_size)
  return session.trainer.evaluate(state, batches, precision)


class _StopRequests:
  """SIGINT/SIGTERM handling while the loop runs.

  The first signal only sets ``requested``: a KeyboardInterrupt raised inside a
  step would leave its donated input state deleted, with nothing to save. A
  second Ctrl-C stops at once, from the last checkpoint.
  """

  def __init__(self):
    self.requested = False
    self._old: dict[int, Any] = {}

  def _on_signal(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    log.warning("Signal %d: saving a checkpoint after this step, then stopping "
                "(Ctrl-C again to stop at once)", signum)
    self.requested = True

  def __enter__(self) -> "_StopRequests":
    if threading.current_thread() is threading.main_thread():
      self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       stop_at: int | None = None) -> dict[str, Any]:
  """Trains and evaluates one run; returns the summary (also written to summary.json).

  stop_at: stop after this many iterations as if interrupted (checkpoint saved,
  no summary), for tests and for splitting a run into jobs.
  """
  config_check.validate(config)
  workdir = config_check.check_workdir(workdir)
  source, trainer, plain_layers = _setup(config)
  if trainer.gated:
    _check_targets_reachable(config)
  session = Session(config, workdir, source, trainer, plain_layers,
                    Checkpoints(workdir, config.checkpoint.keep))
  (workdir / run_files.CONFIG).write_text(config.to_json_best_effort(indent=2) + "\n")

  state, run = session.checkpoints.restore(trainer.abstract_state())
  if state is None:
    state, run = trainer.init_state(config.seed), RunState()
  else:
    state = trainer.put_replicated(state)
    log.info("Resuming %s from step %d", workdir, int(state.step))
  session.tensorboard = _TensorBoard(workdir / run_files.TENSORBOARD)
  first = int(state.step)
  stop_at = session.total_iters if stop_at is None else min(stop_at, session.total_iters)
  state, step, stopped = _loop(session, run, state, first, stop_at)
  if stopped is not None:
    return stopped
  if step < session.total_iters:  # Stopped by a signal or stop_at, after saving a checkpoint.
    log.warning("Stopped at step %d with a checkpoint; run again with the same workdir to "
                "resume", step)
    return {"stopped_at": step}
  summary = _summary(session, run)
  (workdir / run_files.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _loop(session: Session, run: RunState, state, first: int, stop_at: int):
  """Steps from ``first`` up to ``stop_at``; returns (state, step, early-stop result or None)."""
  config, trainer = session.config, session.trainer
  indicator = _make_indicator(config, run.indicator)
  interval = Interval(run.interval)
  bs = config.train.batch_size
  t_start, wall_base = time.perf_counter(), run.wall_s
  step = first
  bar = tqdm.tqdm(total=session.total_iters, initial=first,
                  desc=f"{config.method} {config.model.name}", dynamic_ncols=True, disable=None)
  try:
    with _StopRequests() as stop:
      for step, batch in zip(range(first, stop_at), _train_batches(session, first)):
        if step == config.train.iters and run.phase == "train" and config.train.finetune_iters:
          run.phase = "finetune"
        precision = steps.precision_for(config, run.stage, run.phase)
        target = _target_cp(config, run.stage)
        tau = dfq.gumbel_tau(step, config.train.iters, config.dfq.tau_start, config.dfq.tau_end)
        state, metrics = trainer.train_step(precision)(
            state, batch, jnp.float32(target if target is not None else 0.0), jnp.float32(tau))
        interval.add(metrics)
        bar.update(1)
        step += 1
        at_eval = step % config.train.eval_every == 0 or step == session.total_iters
        if step % config.train.log_every == 0 or at_eval:
          interval.flush()
          _check_finite(session, interval, step)
          cp = interval.mean("steer_cp") or interval.mean("model_cp")
          bar.set_postfix(loss=f"{interval.mean('ce'):.3f}",
                          acc=f"{100 * interval.mean('correct') / bs:.1f}",
                          cp=f"{cp:.2f}", stage=run.stage, refresh=False)
        if at_eval:
          run.wall_s = wall_base + time.perf_counter() - t_start
          _end_interval(session, run, indicator, interval, state, step, precision, target)
          interval = Interval()
        elif stop.requested or step == stop_at:
          run.wall_s = wall_base + time.perf_counter() - t_start
          run.indicator, run.interval = indicator.state_dict(), interval.state_dict()
          session.checkpoints.save(step, state, run)
        if stop.requested:
          break
  except KeyboardInterrupt:
    last = session.checkpoints.latest_step() or 0
    log.warning("Interrupted; running again with the same workdir resumes from step %d", last)
    return state, step, {"stopped_at": last}
  finally:
    bar.close()
  return state, step, None


def _check_finite(session: Session, interval: Interval, step: int) -> None:
  loss = interval.mean("ce")
  if not math.isfinite(loss):
    c = session.config
    raise FloatingPointError(
        f"training loss became {loss} at step {step} ({c.method}, {c.model.name}, "
        f"lr {interval.mean('lr'):.3g}); the last good checkpoint in "
        f"{session.workdir / run_files.CHECKPOINTS} is kept: lower optim.lr or check the data")


def evaluate_checkpoint(config: ml_collections.ConfigDict,
                        workdir: str | pathlib.Path) -> dict[str, Any]:
  """Evaluates the workdir's latest checkpoint at the precision it was training at."""
  config_check.validate(config)
  workdir = pathlib.Path(workdir)
  if not (workdir / run_files.CHECKPOINTS).is_dir():
    raise FileNotFoundError(f"no checkpoints in {workdir / run_files.CHECKPOINTS}: train there first")
  source, trainer, plain_layers = _setup(config)
  session = Session(config, workdir, source, trainer, plain_layers,
                    Checkpoints(workdir, config.checkpoint.keep))
  state, run = session.checkpoints.restore(trainer.abstract_state())
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {workdir / run_files.CHECKPOINTS}")
  state = trainer.put_replicated(state)
  ev = _evaluate(session, state, steps.precision_for(config, run.stage, run.phase))
  return {"step": int(state.step), "stage": run.stage, "phase": run.phase, **ev}


def _end_interval(session: Session, run: RunState, indicator: pfq.TurningPointIndicator,
                  interval: Interval, state, step: int, precision: steps.Precision,
                  target: float | None) -> None:
  """Count the interval's cost, evaluate, log, feed the indicator, checkpoint."""
  config, trainer = session.config, session.trainer
  interval.flush()
  samples = interval.steps * config.train.batch_size
  run.cost = [total + interval.mean(k) * samples
              for total, k in zip(run.cost, ("cost_fw", "cost_eb", "cost_gc"))]
  run.cost_paper += interval.mean("paper_cp") / 100 * trainer.fp32_step_cost * samples
  run.model_cp_sum += interval.sums["model_cp"]
  run.cp_steps += interval.steps
  # Only gated steps have a steering cp (a gated model's fine-tuning has none).
  steer_steps = interval.counts.get("steer_cp", 0)
  run.steer_cp_sum += interval.sums.get("steer_cp", 0.0)
  run.steer_cp_steps += steer_steps
  ev = _evaluate(session, state, precision)
  run.last_test_acc = ev["test_acc"]
  run.best_test_acc = max(ev["test_acc"], run.best_test_acc or -1.0)
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
      "cost_gc": run.cost[2], "cost_paper": run.cost_paper, "wall_s": run.wall_s,
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
    log.info("Turning point at step %d: stage %d", step, indicator.stage)
  run.indicator, run.interval = indicator.state_dict(), None
  session.checkpoints.save(step, state, run)


def _summary(session: Session, run: RunState) -> dict[str, Any]:
  config = session.config
  samples = session.total_iters * config.train.batch_size
  return {
      "method": config.method, "model": config.model.name, "dataset": config.data.dataset,
      "iters": session.total_iters, "final_test_acc": run.last_test_acc,
      "best_test_acc": run.best_test_acc, "total_cost": sum(run.cost),
      "cost_fw": run.cost[0], "cost_eb": run.cost[1], "cost_gc": run.cost[2],
      "cost_paper": run.cost_paper,
      "cost_fp32": cost.fp32_cost(session.plain_layers).total * samples,
      "cost_sbm8": cost.static_cost(session.plain_layers, (8, 8)).total * samples,
      "mean_model_cp": run.model_cp_sum / max(run.cp_steps, 1),
      "mean_steer_cp": run.steer_cp_sum / run.steer_cp_steps if run.steer_cp_steps else None,
      "turning_points": run.turning_points, "wall_s": run.wall_s,
  }
