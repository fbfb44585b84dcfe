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


@dataclasses.dataclass(frozen=True)
class _End:
  error: BaseException | None = None


def prefetch_to_device(iterator: Iterable[Any], sharding: jax.sharding.Sharding,
                       size: int = 2) -> Iterator[Any]:
  """Yields the batches of `iterator` placed with `sharding`, `size` ahead.

  A background thread runs `jax.device_put` on up to `size` batches while the
  caller works on the current one. An error in `iterator` is raised in the
  caller. Closing (or dropping) the returned generator stops the thread.
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
        if not put(jax.device_put(batch, sharding)):
          return
    except BaseException as e:  # pylint: disable=broad-exception-caught
      put(_End(e))
      return
    put(_End())

  threading.Thread(target=work, daemon=True, name="prefetch_to_device").start()

  def batches() -> Iterator[Any]:
    try:
      while True:
        item = ready.get()
        if isinstance(item, _End):
          if item.error is not None:
            raise item.error
          return
        yield item
    finally:
      stop.set()

  return batches()
