"""TensorBoard scalars written without TensorFlow.

:class:`TensorBoardWriter` writes an event file (``events.out.tfevents.*``)
with the ``tensorboard`` package's own pieces: the ``Event`` and ``Summary``
protos of ``tensorboard.compat.proto`` and the TFRecord framing of
``tensorboard.summary.writer.record_writer.RecordWriter``, into a plain
Python file. It does not use ``EventFileWriter``, which reaches the file
system through ``tensorboard.compat.tf`` and so imports TensorFlow wherever
TensorFlow is installed.

Scalars are ``simple_value`` summaries (as tensorboardX and PyTorch write
them); TensorBoard shows them in its Scalars tab, and
``EventAccumulator(...).Scalars(tag)`` reads them back.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import socket
import time
from collections.abc import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

# Distinguishes the event files of writers opened in one process within one second.
_uid = itertools.count()


class TensorBoardWriter:
  """Appends scalars to a new event file in `logdir`, flushed after each `write`.

  Each writer makes its own file (``events.out.tfevents.<time>.<host>.<pid>.<n>``);
  TensorBoard reads every event file of a folder, so a resumed run simply adds
  one. Usable as a context manager.
  """

  def __init__(self, logdir: pathlib.Path | str):
    self.logdir = pathlib.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = (f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_uid)}")
    self.path = self.logdir / name
    self._file = open(self.path, "wb")  # pylint: disable=consider-using-with
    self._records = RecordWriter(self._file)
    # The first record of every event file names its format.
    self._add(event_pb2.Event(wall_time=now, file_version="brain.Event:2"))

  def _add(self, event: event_pb2.Event) -> None:
    if self._file.closed:
      raise ValueError(f"TensorBoardWriter for {self.logdir} is closed")
    self._records.write(event.SerializeToString())
    self._records.flush()

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes `scalars` (tag -> number) at `step` as one event, then flushes."""
    values = []
    for tag, value in scalars.items():
      try:
        number = float(value)
      except (TypeError, ValueError) as err:
        raise TypeError(f"TensorBoard scalar {tag!r} must be a number, got {value!r}") from err
      values.append(summary_pb2.Summary.Value(tag=str(tag), simple_value=number))
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                              summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    if not self._file.closed:
      self._records.flush()

  def close(self) -> None:
    """Flushes and closes the file; closing twice is harmless."""
    if not self._file.closed:
      self._records.flush()
      self._records.close()

  def __enter__(self) -> "TensorBoardWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
