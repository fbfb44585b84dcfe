"""The process side of a run: signals, the run's log file, speed and time left.

No JAX here (``report`` imports ``hms``). ``StopRequests`` turns Ctrl-C and
SIGTERM into a request the loop answers after the step in flight; ``RunLog``
copies this package's log lines into ``WORKDIR/log.txt``; ``Speed`` measures
examples per second and the time left from the first compiled step on.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import threading
import time
from typing import Any

from fractrain_jax.errors import UserError, first_line, one_line
from fractrain_jax.run import files as run_files

log = logging.getLogger(__name__)


def hms(seconds: float | None) -> str:
  """``h:mm:ss``; "n/a" for None."""
  if seconds is None:
    return "n/a"
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StopRequests:
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

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)


def signal_text(signum: int, process: int, processes: int) -> str:
  """``SIGINT (signal 2)``, and with several processes which one received it."""
  try:
    name = f"{signal.Signals(signum).name} (signal {signum})"
  except ValueError:
    name = f"signal {signum}"
  return name if processes == 1 else f"{name} received by process {process}"


class RunLog:
  """A copy of this package's log lines in WORKDIR/log.txt while the run lasts."""

  def __init__(self, workdir: pathlib.Path):
    self.handler = logging.FileHandler(workdir / run_files.LOG, encoding="utf-8")
    self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                                "%Y-%m-%d %H:%M:%S"))
    self.handler.setLevel(logging.INFO)
    self.logger = logging.getLogger("fractrain_jax")

  def __enter__(self) -> "RunLog":
    self.logger.addHandler(self.handler)
    if self.logger.getEffectiveLevel() > logging.INFO:
      self.logger.setLevel(logging.INFO)
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
      # The error that ended the run, in the file only: the console gets it from main.py.
      message = (f"error: {first_line(exc) or type(exc).__name__}" if isinstance(exc, UserError)
                 else f"crashed: {one_line(exc, limit=None)}")
      self.handler.emit(logging.LogRecord(self.logger.name, logging.ERROR, __file__, 0,
                                          message, None, None))
    self.logger.removeHandler(self.handler)
    self.handler.close()


class Speed:
  """Examples per second and the time left, measured from the first compiled step on."""

  def __init__(self, step: int):
    self.restart(step)

  def restart(self, step: int) -> None:
    self.step0, self.t0 = step, time.perf_counter()

  def per_second(self, step: int, batch_size: int) -> float | None:
    """Examples (images, or the LM's windows) per second."""
    dt = time.perf_counter() - self.t0
    return (step - self.step0) * batch_size / dt if dt > 0 and step > self.step0 else None

  def eta(self, step: int, total: int) -> str:
    dt = time.perf_counter() - self.t0
    if step <= self.step0 or dt <= 0:
      return "?"
    return hms((total - step) * dt / (step - self.step0))


def throughput(per_second: float | None, context: int | None = None) -> list[str]:
  """Examples per second as a line part: images, or tokens when a sample is a window of
  ``context`` tokens (the LM); none before the first timed step."""
  if per_second is None:
    return []
  if context is not None:
    return [f"{per_second * context:.0f} tokens/s"]
  return [f"{per_second:.0f} img/s"]


def progress_line(step: int, total: int, loss: float, acc: float, cp: float,
                  rate: list[str], eta: str) -> str:
  """The progress bar's figures as one line, for a run without a terminal."""
  return " | ".join([f"step {step}/{total}", f"loss {loss:.3f} acc {acc:.1f}%",
                     f"cp {cp:.2f}%", *rate, f"ETA {eta}"])


def event_line(record: dict[str, Any], total: int, method_parts: list[str], rate: list[str],
               eta: str) -> str:
  """One evaluation (a metrics line) as one console line (also in log.txt)."""
  parts = [f"step {record['step']}/{total}",
           f"train loss {record['train_loss']:.3f} acc {record['train_acc']:.1f}%",
           f"test loss {record['test_loss']:.3f} acc {record['test_acc']:.2f}%"
           + (f" ppl {record['test_ppl']:.2f}" if "test_ppl" in record else "")]
  if record.get("steer_cp") is not None:
    parts.append(f"steer cp {record['steer_cp']:.2f}% (target {record['target_cp']:g}%)")
  parts.append(f"model cp {record['model_cp']:.2f}%")
  parts += method_parts
  if record["phase"] != "train":
    parts.append(record["phase"])
  return " | ".join(parts + rate + [f"ETA {eta}"])
