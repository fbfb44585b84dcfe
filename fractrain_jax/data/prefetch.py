"""Host-to-device prefetch: :func:`prefetch_to_device`.

Overlaps the host-to-device copy of streamed batches
(:mod:`fractrain_jax.data.stream`) with the train step.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax

from fractrain_jax import processes


# Long enough for one batch in flight (read, decode, copy) to finish.
JOIN_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class _End:
  error: BaseException | None = None


def prefetch_to_device(iterator: Iterable[Any], sharding: jax.sharding.Sharding,
                       size: int = 2, *, local: bool = False) -> Iterator[Any]:
  """Yields the batches of `iterator` placed with `sharding`, `size` ahead.

  A background thread places up to `size` batches while the caller works on
  the current one. An error in `iterator` is raised in the caller. ``close()``
  on the returned iterator stops the thread and waits for it (a thread still
  inside tf.data when the interpreter exits aborts the process); dropping it
  stops the thread without waiting.

  local: the batches hold this process's rows of each global batch (several
  processes); they are assembled into global arrays.
  """
  if size < 1:
    raise ValueError(f"size={size} must be >= 1")
  ready: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def work() -> None:
    try:
      for batch in iterator:
        if not put(processes.global_batch(sharding, batch, local=local)):
          return
    except BaseException as e:  # pylint: disable=broad-exception-caught
      put(_End(e))
      return
    put(_End())

  thread = threading.Thread(target=work, daemon=True, name="prefetch_to_device")
  thread.start()
  return _Prefetched(ready, stop, thread)


class _Prefetched(Iterator[Any]):
  """The caller's side of ``prefetch_to_device``: the batches, and ``close``."""

  def __init__(self, ready: queue.Queue, stop: threading.Event, thread: threading.Thread):
    self._ready, self._stop, self.thread = ready, stop, thread

  def __next__(self) -> Any:
    if self._stop.is_set():
      raise StopIteration
    item = self._ready.get()
    if isinstance(item, _End):
      self.close()
      if item.error is not None:
        raise item.error
      raise StopIteration
    return item

  def close(self) -> None:
    """Stops the thread and waits for it (the batch being read finishes first)."""
    self._stop.set()
    self.thread.join(timeout=JOIN_TIMEOUT_S)

  def __del__(self) -> None:
    self._stop.set()
