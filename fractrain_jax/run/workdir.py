"""A run's workdir as one record that never disagrees with itself.

What a run leaves in its workdir (``files``) is written here so that the
files agree after any crash:

- ``check_writable``: every folder the run writes (the workdir,
  ``checkpoints/``, ``checkpoints_bad/``, ``tensorboard/``) is proven
  writable at the start, before data is read or anything compiles.
- ``Lock``: one run per workdir, an exclusive ``flock`` on ``WORKDIR/.lock``,
  which names the holder's pid and host for the refusal; the kernel releases
  it when its process dies, so a lock left by a killed run is taken over.
- ``MetricsFile``: ``metrics.jsonl`` as strict JSON (a non-finite number is
  written as ``null``), one line per evaluated step, appended only after the
  checkpoint of that step is committed. ``align`` cuts the file back to the
  restored checkpoint on every start (and puts back that checkpoint's own line
  if a crash lost it), so its lines are exactly the evaluations up to the
  newest good checkpoint; TensorBoard's history is rebuilt from those lines.
- ``write_json``: ``config.json`` and ``summary.json``, atomically, strict JSON.
- ``record_without_checkpoint``: a record (metrics lines, a summary)
  with no checkpoint to go on from is refused, never replaced by a new start.

Every write failure (permissions, a full disk, a quota) becomes one
``StorageError`` naming the path.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import math
import os
import pathlib
import secrets
import socket
import tempfile
from typing import Any, Iterator

import numpy as np

from fractrain_jax.errors import StorageError, WorkdirInUseError, os_reason
from fractrain_jax.run import files as run_files
from fractrain_jax.run.tensorboard_writer import TensorBoardWriter

log = logging.getLogger(__name__)

LOCK = ".lock"


def strict(obj: Any) -> Any:
  """``obj`` with every non-finite float (NumPy's too) as None, so JSON stays strict."""
  if isinstance(obj, dict):
    return {k: strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def dumps(obj: Any, **kwargs) -> str:
  return json.dumps(strict(obj), allow_nan=False, **kwargs)


@contextlib.contextmanager
def storage(path: pathlib.Path | str, what: str) -> Iterator[None]:
  """Turns an OSError while writing ``what`` at ``path`` into one StorageError line."""
  try:
    yield
  except OSError as err:
    if isinstance(err, StorageError):
      raise
    raise StorageError(f"cannot write {what} {path}: {os_reason(err)}") from None


def replace_text(path: pathlib.Path, text: str, what: str) -> None:
  """Writes ``text`` to ``path`` atomically (a temporary file beside it, renamed): a crash
  leaves the old file or the new one, never a part."""
  with storage(path, what):
    # Created with mode 0666 as open() does, so the umask applies (mkstemp's is 0600).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
      with os.fdopen(fd, "w") as f:
        f.write(text)
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes ``obj`` to ``path`` as indented strict JSON, atomically."""
  replace_text(path, dumps(obj, indent=2) + "\n", "the file")


def check_writable(workdir: pathlib.Path) -> None:
  """Proves every folder the run writes writable (or creatable); StorageError names the first
  that is not."""
  for folder in (workdir, workdir / run_files.CHECKPOINTS, workdir / run_files.BAD_CHECKPOINTS,
                 workdir / run_files.TENSORBOARD):
    target = folder if folder.exists() else folder.parent
    if folder.exists() and not folder.is_dir():
      raise StorageError(f"cannot write the folder {folder}: it is a file")
    with storage(folder, "the folder"):
      probe_write(target)


def probe_write(folder: pathlib.Path) -> None:
  """Writes and removes a small file in ``folder``; raises OSError where that fails."""
  fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=folder)
  try:
    os.write(fd, b"ok")
  finally:
    os.close(fd)
    os.remove(probe)


def _holder(text: str) -> dict[str, str]:
  try:
    return dict(json.loads(text))
  except (ValueError, TypeError):
    return {}


class Lock:
  """One run per workdir: ``with Lock(workdir):`` refuses (WorkdirInUseError) while another
  process holds it, and takes over, with a warning, a lock whose process is gone."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / LOCK
    self._file = None

  def __enter__(self) -> "Lock":
    with storage(self.path, "the lock file"):
      self._file = open(self.path, "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
      self._file.seek(0)
      holder = _holder(self._file.read())
      self._file.close()
      if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise StorageError(f"cannot lock {self.path}: {os.strerror(err.errno)}") from None
      who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
             f"{holder.get('since', '?')}")
      raise WorkdirInUseError(f"{self.path.parent} is in use by another run ({who}); wait "
                              "for it to end or use another --workdir") from None
    self._file.seek(0)
    stale = _holder(self._file.read())
    if stale:
      log.warning("Took over the lock of %s left by pid %s on host %s, which no longer runs",
                  self.path.parent, stale.get("pid", "?"), stale.get("host", "?"))
    self._file.seek(0)
    self._file.truncate()
    self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.datetime.now().isoformat(timespec="seconds")}))
    self._file.flush()
    return self

  def __exit__(self, *exc) -> None:
    if self._file is None or self._file.closed:
      return
    with contextlib.suppress(OSError):
      self._file.seek(0)
      self._file.truncate()  # A clean exit leaves no holder to take over.
    self._file.close()  # Closing releases the flock.
    with contextlib.suppress(OSError):
      self.path.unlink()


def record_without_checkpoint(workdir: pathlib.Path, has_checkpoint: bool) -> str | None:
  """The refusal of a workdir whose record (metrics lines, a summary) has no checkpoint to
  go on from, as starting over would silently replace that record; None otherwise."""
  lines = MetricsFile(workdir, write=False).read()
  summary = (workdir / run_files.SUMMARY).exists()
  if has_checkpoint or not (lines or summary):
    return None
  held = [f"{len(lines)} lines in {run_files.METRICS}, up to step {lines[-1].get('step')}"
          ] if lines else []
  held += [run_files.SUMMARY] if summary else []
  names = [f for f in (run_files.METRICS, run_files.SUMMARY) if (workdir / f).exists()]
  return (f"{workdir} holds the record of an earlier run ({', '.join(held)}) but no "
          f"checkpoint to resume from in {workdir / run_files.CHECKPOINTS}; to start over, "
          f"move {' and '.join(names)} aside (or delete {'them' if len(names) > 1 else 'it'}), "
          "or use another --workdir")


def scalars(record: dict[str, Any]) -> dict[str, float]:
  """The numeric, finite values of a metrics line: what TensorBoard shows."""
  return {k: float(v) for k, v in record.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MetricsFile:
  """``metrics.jsonl`` and the TensorBoard history it mirrors, kept one line per evaluated step.

  write: False in every process but the one that writes the record (several processes).
  """

  def __init__(self, workdir: pathlib.Path, *, write: bool = True):
    self.write = write
    self.path = workdir / run_files.METRICS
    self.tensorboard_dir = workdir / run_files.TENSORBOARD
    self.tensorboard: TensorBoardWriter | None = None

  def read(self) -> list[dict[str, Any]]:
    """The file's lines (a torn last line, from a crash mid-write, is dropped)."""
    if not self.path.exists():
      return []
    lines = []
    for text in self.path.read_text().splitlines():
      try:
        lines.append(strict(json.loads(text)))  # Older files may hold NaN tokens.
      except json.JSONDecodeError:
        break
    return lines

  def align(self, step: int, record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Keeps one line per step up to ``step`` (the restored checkpoint's), the later of any
    duplicate; ``record`` (that checkpoint's own line) replaces or restores its step's line.
    Rewrites the file and TensorBoard's history to match, and returns the lines."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in self.read():
      if isinstance(line.get("step"), int) and line["step"] <= step:
        by_step[line["step"]] = line
    if record is not None and record.get("step", step + 1) <= step:
      by_step[record["step"]] = strict(record)
    lines = [by_step[s] for s in sorted(by_step)]
    if not self.write:
      return lines
    if lines or self.path.exists():
      replace_text(self.path, "".join(dumps(line) + "\n" for line in lines), "the metrics file")
    self._rebuild_tensorboard(lines)
    return lines

  def _rebuild_tensorboard(self, lines: list[dict[str, Any]]) -> None:
    with storage(self.tensorboard_dir, "TensorBoard's folder"):
      if self.tensorboard_dir.exists():
        for old in self.tensorboard_dir.glob("events.out.tfevents.*"):
          old.unlink()
      self.tensorboard = TensorBoardWriter(self.tensorboard_dir)
      for line in lines:
        self.tensorboard.write(line["step"], scalars(line))

  def append(self, record: dict[str, Any]) -> None:
    """Adds one evaluation's line (after its checkpoint is committed) and its scalars."""
    if not self.write:
      return
    with storage(self.path, "the metrics file"):
      with open(self.path, "a") as f:
        f.write(dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
      if self.tensorboard is not None:
        self.tensorboard.write(record["step"], scalars(record))

  def close(self) -> None:
    if self.tensorboard is not None:
      with contextlib.suppress(OSError):
        self.tensorboard.close()
