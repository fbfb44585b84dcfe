"""A run's checkpoints: the arrays, the bookkeeping beside them, and what run they belong to.

Every checkpoint (Orbax, under ``WORKDIR/checkpoints/<step>``) holds a
``steps.TrainState`` (the arrays the train step updates) and a ``Progress``
(everything else needed to continue exactly: stage, indicator, costs counted,
best accuracy, the run's identity). ``Checkpoints`` saves and restores them,
refuses a workdir that holds another run (``run_identity``), and moves a
checkpoint that does not restore, or that a diverged run wrote, aside into
``checkpoints_bad/`` (never deleted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import shutil
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from fractrain_jax import attach, data, methods, models, processes, steps
from fractrain_jax.errors import ResumeError, StorageError, first_line, one_line
from fractrain_jax.run import files as run_files
from fractrain_jax.run.orbax_loops import draining
from fractrain_jax.run.workdir import strict

log = logging.getLogger(__name__)

# TrainState fields renamed since checkpoints were first written: old name -> new.
_RENAMED_FIELDS = {"rest": "batch_stats"}


@dataclasses.dataclass
class Progress:
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
  interval: dict | None = None          # IntervalMetrics.state_dict() of an unfinished interval.
  record: dict | None = None            # The last metrics line, written once this is committed.
  identity: dict | None = None          # What the run is (run_identity); resuming checks it.
  train_loss: float | None = None       # Mean training loss of the steps before this save.

  @classmethod
  def from_dict(cls, d: dict) -> "Progress":
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
  source = data.find_source(config.data.dataset)
  identity = {"method": config.method, "model": config.model.name,
              "dataset": source.canonical(config.data.dataset)}
  # The statistics the images are normalized with, where they are not those every run
  # used before data.normalization existed (CIFAR's in memory, ImageNet's when streamed):
  # an older folder run then resumes only with data.normalization='cifar10'.
  if source.task != "lm":
    stats = data.sources.normalization(source, config)
    if stats != ("imagenet" if source.streamed else "cifar10"):
      identity["normalization"] = stats
  if config.model.name == models.LM:  # Its shape, and which split trains.
    identity["lm"] = methods.model_options(config)
    identity["splits"] = [config.data.text_train, config.data.text_test]
  if attach.is_factory(config.model.name):  # What the factory builds, and what is quantized.
    identity["options"] = methods.model_options(config)
    identity["quantize"] = list(config.model.quantize)
    if methods.get(config.method).gated:
      identity["blocks"] = list(config.model.blocks)
    if source.task == "lm":
      identity["context"] = config.model.lm.context
      identity["splits"] = [config.data.text_train, config.data.text_test]
  identity.update(methods.get(config.method).identity(config))
  return identity


def _reason(err: BaseException) -> str:
  """The OS's reason inside an error, else its first line. Orbax wraps OSErrors; TensorStore
  reports them as ``... [os_error_code='28']`` inside a ValueError."""
  seen = err
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return os.strerror(seen.errno)
    code = re.search(r"os_error_code='(\d+)'", str(seen))
    if code:
      return os.strerror(int(code.group(1)))
    seen = seen.__cause__ or seen.__context__
  return one_line(err)


def _restore_reason(err: BaseException, limit: int = 300) -> str:
  """Why a checkpoint did not restore, in one line of at most ``limit`` characters.

  The innermost error Orbax wrapped (TensorStore's own words), without the
  TensorStore spec that Orbax and TensorStore append. TensorStore nests its
  reasons ("CODE: Error opening ...: Error reading ...: what failed"); where the
  whole is too long, outer ones are dropped first, so the file and what went
  wrong with it stay.
  """
  root = err
  while root.__cause__ is not None:
    root = root.__cause__
  text = re.split(r" \[tensorstore_spec| See full TensorStore details", first_line(root))[0]
  parts = re.split(r": (?=[A-Z])", text)
  head = f"{type(root).__name__}: "
  while len(parts) > 2 and len(head) + len(": ".join(parts)) > limit:
    del parts[1]
  return (head + ": ".join(parts))[:limit]


def _megabytes(size: int) -> str:
  """``0.6 MB``, ``82.8 GB``."""
  return f"{size / 1e6:.1f} MB" if size < 1e9 else f"{size / 1e9:.1f} GB"


def _comparable(identity: dict) -> dict:
  """``identity`` with its dataset spelt as ``run_identity`` spells it now (older checkpoints
  hold the name as it was typed)."""
  try:
    dataset = data.find_source(identity.get("dataset")).canonical(identity["dataset"])
  except (ValueError, KeyError):
    return identity
  return {**identity, "dataset": dataset}


def _describe(identity: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in identity.items())


class Checkpoints:
  """The workdir's Orbax checkpoints: a ``TrainState`` and a ``Progress`` per saved step.

  A checkpoint that does not restore (a truncated array file, missing
  metadata) is moved aside into ``checkpoints_bad/`` when an older one does.
  """

  def __init__(self, workdir: pathlib.Path, keep: int):
    self.workdir = workdir
    self.keep = keep
    self.directory = (workdir / run_files.CHECKPOINTS).absolute()
    self._open()

  def _open(self) -> None:
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True))

  def save(self, step: int, state: steps.TrainState, progress: Progress) -> None:
    """Commits checkpoint ``step``; StorageError (one line) when it cannot be written, with
    its partial folder removed and the newest committed checkpoint named."""
    try:
      with draining():
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(strict(dataclasses.asdict(progress)))), force=True)
        self.manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      # Let Orbax's background writers end before their partial folder is removed.
      for finish in (self.manager.wait_until_finished, self.manager.close):
        with contextlib.suppress(Exception):
          finish()
      self._remove_partial()
      self._open()
      kept = [s for s in self._committed() if s != step]
      where = f"the newest checkpoint kept is step {kept[0]}" if kept else "no checkpoint is kept"
      raise StorageError(f"cannot write the checkpoint of step {step} in {self.directory} "
                         f"({_reason(err)}; {self._room(state, kept)}); {where}") from None

  def _room(self, state: steps.TrainState, kept: list[int]) -> str:
    """How much room the checkpoints need and how much is free, for a failed save's message."""
    if kept:  # What Orbax wrote last time; else the arrays' own size, close to it.
      size = sum(f.stat().st_size for f in (self.directory / str(kept[0])).rglob("*")
                 if f.is_file())
    else:
      size = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state))
    try:
      free = f", {_megabytes(shutil.disk_usage(self.directory).free)} free there"
    except OSError:
      free = ""
    return (f"a checkpoint takes about {_megabytes(size)} and checkpoint.keep={self.keep} "
            f"are kept{free}")

  def _committed(self) -> list[int]:
    """Committed checkpoints, newest first, read from the folder (the manager may be stale)."""
    if not self.directory.is_dir():
      return []
    return sorted((int(p.name) for p in self.directory.iterdir()
                   if p.is_dir() and p.name.isdigit()), reverse=True)

  def _remove_partial(self) -> None:
    """Removes what an interrupted save leaves: Orbax's temporary folders (a writer thread
    finishing late can bring one back for a moment, hence the second look)."""
    for _ in range(5):
      partial = list(self.directory.glob("*.orbax-checkpoint-tmp*")) if self.directory.is_dir() else []
      if not partial:
        return
      for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
      time.sleep(0.1)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps(), reverse=True)

  def read_meta(self, step: int) -> Progress:
    with draining():
      out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return Progress.from_dict(out["meta"])

  def move_aside(self, step: int, why: str) -> pathlib.Path:
    """Renames checkpoint ``step`` into ``checkpoints_bad/`` and reopens the manager.

    With several processes, process 0 moves it and every process waits for that.
    """
    bad_root = self.workdir / run_files.BAD_CHECKPOINTS
    target = bad_root / f"{step}-{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    self.manager.close()  # Its view of the steps is stale once a folder moves.
    if processes.is_writer():
      bad_root.mkdir(exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    processes.barrier(f"moved aside checkpoint {step}")
    self._open()
    return target

  def check_identity(self, identity: dict) -> None:
    """Refuses (ResumeError) a workdir whose newest readable checkpoint is of another run.

    Reads only the small JSON part, so it answers before any data is loaded
    and before anything in the workdir is written.
    """
    for step in self.steps():
      try:
        progress = self.read_meta(step)
      except Exception:  # pylint: disable=broad-except
        continue  # restore() will move it aside and say so.
      if progress.identity is not None and _comparable(progress.identity) != identity:
        raise ResumeError(
            f"{self.workdir} holds a checkpoint of another run ({_describe(progress.identity)}); "
            f"this config is {_describe(identity)}. Use another --workdir, or the first "
            "run's settings to resume it")
      return

  def _restore_state(self, step: int, abstract_state: steps.TrainState):
    """The arrays and Progress of checkpoint ``step``, also one written under older field names."""
    def read(target):
      with draining():  # A failed read ends every other read before it returns.
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      return out["state"], Progress.from_dict(out["meta"])

    try:
      return read(abstract_state)
    except Exception as err:  # pylint: disable=broad-except
      first = err
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    renamed = {old: new for old, new in _RENAMED_FIELDS.items() if new in fields}
    if renamed:
      old_of = {new: old for old, new in renamed.items()}
      try:  # The names on disk, then the new ones.
        state, progress = read({old_of.get(k, k): v for k, v in fields.items()})
        return steps.TrainState(**{renamed.get(k, k): v for k, v in state.items()}), progress
      except Exception:  # pylint: disable=broad-except
        pass
    raise first  # Raised outside an except block: its cause stays TensorStore's reason.

  def restore(self, abstract_state) -> tuple[steps.TrainState | None, Progress | None]:
    """The newest checkpoint that restores, with its Progress; (None, None) when there is none.

    Newer checkpoints that failed are moved aside once an older one restores. When
    none restores the failure is the run's, not the files' (another topology, a
    library that cannot read them): nothing is moved and ResumeError says why.
    """
    failed = []
    for step in self.steps():
      try:
        restored, error = self._restore_state(step, abstract_state), None
      except Exception as err:  # pylint: disable=broad-except
        restored, error = None, err
      # Every process goes on from the same checkpoint: one that failed anywhere is bad.
      if not processes.agree_any(error is not None):
        for bad, why in failed:
          moved = self.move_aside(bad, "unreadable")
          log.warning("Checkpoint of step %d could not be restored (%s); moved it to %s and "
                      "resumed from step %d", bad, why, moved, step)
        return restored
      failed.append((step, _restore_reason(error) if error is not None else
                     "it failed in another process"))
    if failed:
      step, why = failed[0]
      raise ResumeError(f"no checkpoint in {self.directory} restores (step {step}: {why}); "
                        "nothing was moved")
    return None, None

