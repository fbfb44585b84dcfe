"""``train_and_evaluate(config, workdir)``: the training loop of every method.

fp32 and static train a plain model at one precision; PFQ raises the precision
at each turning point of the loss-plateau indicator (SPEC section 3); DFQ
trains the gated model towards a target cp (section 4); FracTrain raises that
target at each turning point (section 5). An optional full-precision phase
follows (``train.finetune_iters``).

Every ``train.eval_every`` iterations the run evaluates, appends a line to
``WORKDIR/metrics.jsonl``, writes TensorBoard scalars and an Orbax checkpoint
that holds everything needed to continue exactly. Starting again in the same
workdir resumes from the latest checkpoint; an interrupt (Ctrl-C, SIGTERM)
saves one first.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from fractrain_jax import config_check, cost, data, dfq, pfq, steps

log = logging.getLogger(__name__)


class _Interval:
  """Host-side sums of the step metrics since the last evaluation."""

  def __init__(self, d: dict | None = None):
    d = d or {}
    self.steps = d.get("steps", 0)
    self.sums = d.get("sums", {})
    self.counts = d.get("counts", {})  # Steps that reported each key.
    self.choice = None if d.get("choice") is None else np.asarray(d["choice"])
    self.pending: list[dict] = []

  def add(self, metrics: dict) -> None:
    self.pending.append(metrics)  # Device arrays: fetching them later keeps dispatch async.

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

  def mean(self, k: str) -> float:
    return self.sums.get(k, 0.0) / max(self.steps, 1)

  def state_dict(self) -> dict:
    self.flush()
    return {"steps": self.steps, "sums": self.sums, "counts": self.counts,
            "choice": None if self.choice is None else self.choice.tolist()}


def _default_meta() -> dict[str, Any]:
  return {"phase": "train", "stage": 0, "indicator": None, "cost": [0.0, 0.0, 0.0],
          "cost_paper": 0.0, "turning_points": [], "best_test_acc": None,
          "last_test_acc": None, "wall_s": 0.0, "model_cp_sum": 0.0, "steer_cp_sum": 0.0,
          "cp_steps": 0, "steer_cp_steps": 0, "interval": None}


class _Run:
  """The state of one run between steps: what a checkpoint holds besides arrays."""

  def __init__(self, config, workdir: pathlib.Path):
    self.config = config
    self.workdir = workdir
    self.ckpt = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True))

  def save(self, step: int, state, meta: dict) -> None:
    self.ckpt.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)), force=True)
    self.ckpt.wait_until_finished()

  def restore(self, abstract_state):
    step = self.ckpt.latest_step()
    if step is None:
      return None, None
    out = self.ckpt.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


def _make_indicator(config) -> pfq.TurningPointIndicator:
  p = config.pfq
  return pfq.TurningPointIndicator(eps=p.eps, alpha=p.alpha,
                                   num_turning_points=p.num_turning_points,
                                   window=p.window, scale_epochs=p.scale_epochs)


def _uses_indicator(method: str) -> bool:
  return method in ("pfq", "frac")


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


def _target_cp(config, stage: int) -> float | None:
  if config.method == "dfq":
    return float(config.dfq.target_cp)
  if config.method == "frac":
    return float(dfq.frac_target(stage, config.dfq.target_cp, config.dfq.target_step))
  return None


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       stop_at: int | None = None) -> dict[str, Any]:
  """Trains and evaluates one run; returns the summary (also written to summary.json).

  stop_at: stop after this many iterations as if interrupted (checkpoint saved,
  no summary), for tests and for splitting a run into jobs.
  """
  config_check.validate(config)
  workdir = config_check.check_workdir(workdir)
  source, trainer, plain_layers = _setup(config)
  if steps.is_gated(config.method):
    _check_targets_reachable(config)
  run = _Run(config, workdir)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  streamed = not isinstance(source, data.ArrayData)

  state, meta = run.restore(trainer.abstract_state())
  if state is None:
    state, meta = trainer.init_state(config.seed), _default_meta()
  else:
    state = trainer.put_replicated(state)
    log.info("Resuming %s from step %d", workdir, int(state.step))
  indicator = _make_indicator(config)
  if meta["indicator"] is not None:
    indicator = pfq.TurningPointIndicator.from_state_dict(meta["indicator"])
  interval = _Interval(meta["interval"])

  if not streamed:
    train_x = trainer.put_replicated(source.train_images)
    train_y = trainer.put_replicated(source.train_labels)

  tb = _TensorBoard(workdir / "tensorboard")
  total_iters = config.train.iters + config.train.finetune_iters
  bs = config.train.batch_size
  step = int(state.step)
  stop_at = total_iters if stop_at is None else min(stop_at, total_iters)

  stop = {"requested": False}

  def on_signal(signum, frame):
    del frame
    if stop["requested"] and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now, from the last checkpoint.
    log.warning("Signal %d: saving a checkpoint after this step, then stopping "
                "(Ctrl-C again to stop at once)", signum)
    stop["requested"] = True

  # The first SIGINT/SIGTERM only sets a flag: a KeyboardInterrupt raised inside
  # a step would leave its donated input state deleted, with nothing to save.
  old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)
                  if _in_main_thread()}

  def meta_now() -> dict:
    meta["indicator"] = indicator.state_dict()
    meta["interval"] = interval.state_dict()
    return meta

  stream = None
  if streamed:
    stream = data.prefetch_to_device(
        source.train_batches(bs, seed=config.seed, start_step=step), trainer.batch_sharding)

  t_start = time.perf_counter()
  wall_base = meta["wall_s"]
  bar = tqdm.tqdm(total=total_iters, initial=step, desc=f"{config.method} {config.model.name}",
                  dynamic_ncols=True, disable=None)
  try:
    while step < stop_at:
      if step == config.train.iters and meta["phase"] == "train" and config.train.finetune_iters:
        meta["phase"] = "finetune"
      bits = steps.precision_for(config, meta["stage"], meta["phase"])
      target = _target_cp(config, meta["stage"])
      tau = dfq.gumbel_tau(step, config.train.iters, config.dfq.tau_start, config.dfq.tau_end)
      fn = trainer.train_step(bits, streamed=streamed)
      target_arr = jnp.float32(target if target is not None else 0.0)
      if streamed:
        x, y = next(stream)
        state, metrics = fn(state, x, y, target_arr, jnp.float32(tau))
      else:
        state, metrics = fn(state, train_x, train_y, target_arr, jnp.float32(tau))
      step += 1
      interval.add(metrics)
      bar.update(1)
      at_eval = step % config.train.eval_every == 0 or step == total_iters
      if step % config.train.log_every == 0 or at_eval:
        interval.flush()
        loss = interval.mean("ce")
        if not math.isfinite(loss):
          raise FloatingPointError(
              f"training loss became {loss} at step {step} ({config.method}, "
              f"{config.model.name}, lr {interval.mean('lr'):.3g}); the last good checkpoint "
              f"in {workdir / 'checkpoints'} is kept: lower optim.lr or check the data")
        cp_key = "steer_cp" if "steer_cp" in interval.sums else "model_cp"
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * interval.mean('correct') / bs:.1f}",
                        cp=f"{interval.mean(cp_key):.2f}", stage=meta["stage"], refresh=False)
      if at_eval:
        _end_interval(config, trainer, state, source, interval, meta, indicator, tb, run,
                      step, bits, target, wall_base + time.perf_counter() - t_start)
        interval = _Interval()
      elif stop["requested"] or step == stop_at:
        meta["wall_s"] = wall_base + time.perf_counter() - t_start
        run.save(step, state, meta_now())
      if stop["requested"]:
        break
  except KeyboardInterrupt:
    last = run.ckpt.latest_step() or 0
    log.warning("Interrupted; running again with the same workdir resumes from step %d", last)
    return {"stopped_at": last}
  finally:
    for s, h in old_handlers.items():
      signal.signal(s, h)
    bar.close()

  if step < total_iters:  # Stopped by a signal or stop_at, after saving a checkpoint.
    log.warning("Stopped at step %d with a checkpoint; run again with the same workdir to "
                "resume", step)
    return {"stopped_at": step}
  summary = _summary(config, meta, trainer, plain_layers, total_iters)
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _setup(config):
  """Data source, Trainer and the plain backbone's layers; refuses bad sizes early."""
  n_dev = config.train.num_devices or jax.device_count()
  for key in ("batch_size", "eval_batch_size"):
    if config.train[key] % n_dev:
      raise ValueError(f"train.{key}={config.train[key]} must be divisible by the "
                       f"{n_dev} devices")
  if data.is_streamed(config.data.dataset):
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
  trainer = steps.Trainer(config, model, mean=source.mean, std=source.std)
  return source, trainer, steps.plain_layer_macs(config, source.num_classes)


def evaluate_checkpoint(config: ml_collections.ConfigDict,
                        workdir: str | pathlib.Path) -> dict[str, Any]:
  """Evaluates the workdir's latest checkpoint at the precision it was training at."""
  config_check.validate(config)
  workdir = pathlib.Path(workdir)
  if not (workdir / "checkpoints").is_dir():
    raise FileNotFoundError(f"no checkpoints in {workdir / 'checkpoints'}: train there first")
  source, trainer, _ = _setup(config)
  state, meta = _Run(config, workdir).restore(trainer.abstract_state())
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
  state = trainer.put_replicated(state)
  bits = steps.precision_for(config, meta["stage"], meta["phase"])
  ev = _evaluate(trainer, state, source, bits)
  return {"step": int(state.step), "stage": meta["stage"], "phase": meta["phase"], **ev}


def _in_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


def _end_interval(config, trainer, state, source, interval: _Interval, meta, indicator, tb, run,
                  step: int, bits, target, wall_s: float) -> None:
  """Evaluate, log, feed the indicator, checkpoint."""
  interval.flush()
  n = interval.steps
  bs = config.train.batch_size
  samples = n * bs
  fw, eb, gc = (interval.mean(k) * samples for k in ("cost_fw", "cost_eb", "cost_gc"))
  meta["cost"] = [meta["cost"][0] + fw, meta["cost"][1] + eb, meta["cost"][2] + gc]
  meta["cost_paper"] += interval.mean("paper_cp") / 100 * trainer.fp32_step_cost * samples
  meta["model_cp_sum"] += interval.sums.get("model_cp", 0.0)
  meta["cp_steps"] += n
  # Steering cp: only the gated steps have one (not a gated model's fine-tuning).
  steer_steps = interval.counts.get("steer_cp", 0)
  meta["steer_cp_sum"] += interval.sums.get("steer_cp", 0.0)
  meta["steer_cp_steps"] += steer_steps
  ev = _evaluate(trainer, state, source, bits)
  meta["last_test_acc"] = ev["test_acc"]
  meta["best_test_acc"] = max(ev["test_acc"], meta["best_test_acc"] or -1.0)
  meta["wall_s"] = wall_s
  record = {
      "step": step, "epoch": step / config.train.eval_every, "lr": interval.mean("lr"),
      "train_loss": interval.mean("ce"), "train_cost_term": interval.mean("cost_term"),
      "train_acc": 100.0 * interval.mean("correct") / bs,
      **ev, "stage": meta["stage"],
      "fw_bits": bits[0] if isinstance(bits, tuple) else None,
      "bw_bits": bits[1] if isinstance(bits, tuple) else None,
      "target_cp": target,
      "steer_cp": interval.sums["steer_cp"] / steer_steps if steer_steps else None,
      "model_cp": interval.mean("model_cp"),
      "cost": sum(meta["cost"]), "cost_fw": meta["cost"][0], "cost_eb": meta["cost"][1],
      "cost_gc": meta["cost"][2], "cost_paper": meta["cost_paper"], "wall_s": wall_s,
      "method": config.method, "model": config.model.name, "phase": meta["phase"],
  }
  if interval.choice is not None:
    record["choice_ratio"] = (interval.choice / steer_steps).tolist()
    record["candidates"] = [list(config.dfq.fw_candidates), list(config.dfq.bw_candidates)]
  with open(run.workdir / "metrics.jsonl", "a") as f:
    f.write(json.dumps(record) + "\n")
  tb.write(step, {k: v for k, v in record.items() if isinstance(v, (int, float))
                  and not isinstance(v, bool) and v is not None})
  # The indicator reads this interval's mean training loss (Alg. 1's epoch loss),
  # FracTrain's with the signed cost term in it, as the authors' script feeds it
  # (train_frac.py:447,454); PFQ's term is 0.
  if (_uses_indicator(config.method) and meta["phase"] == "train"
      and indicator.update(record["train_loss"] + record["train_cost_term"])):
    meta["stage"] = indicator.stage
    meta["turning_points"].append(step)
    log.info("Turning point at step %d: stage %d", step, indicator.stage)
  meta["indicator"] = indicator.state_dict()
  meta["interval"] = None
  run.save(step, state, meta)


def _evaluate(trainer, state, source, bits) -> dict[str, float]:
  """Test loss and accuracy: in-memory arrays, or the streamed test split."""
  bs = trainer.config.train.eval_batch_size
  if isinstance(source, data.ArrayData):
    batches = steps.padded_batches(source.test_images, source.test_labels, bs)
    return trainer.evaluate(state, batches, bits)
  return trainer.evaluate(state, source.test_batches(bs), bits, preprocessed=True)


def _summary(config, meta, trainer, plain_layers, total_iters: int) -> dict[str, Any]:
  samples = total_iters * config.train.batch_size
  return {
      "method": config.method, "model": config.model.name, "dataset": config.data.dataset,
      "iters": total_iters, "final_test_acc": meta["last_test_acc"],
      "best_test_acc": meta["best_test_acc"], "total_cost": sum(meta["cost"]),
      "cost_fw": meta["cost"][0], "cost_eb": meta["cost"][1], "cost_gc": meta["cost"][2],
      "cost_paper": meta["cost_paper"],
      "cost_fp32": cost.fp32_cost(plain_layers).total * samples,
      "cost_sbm8": cost.static_cost(plain_layers, (8, 8)).total * samples,
      "mean_model_cp": meta["model_cp_sum"] / max(meta["cp_steps"], 1),
      "mean_steer_cp": (meta["steer_cp_sum"] / meta["steer_cp_steps"]
                        if meta["steer_cp_steps"] else None),
      "turning_points": meta["turning_points"], "wall_s": meta["wall_s"],
  }
