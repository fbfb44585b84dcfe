"""Orbax's asyncio event loops, closed only once every task on them has ended.

Orbax runs each save and restore on a fresh event loop (``run_until_complete``
then ``close``). When one read of a restore fails, ``asyncio.gather`` raises at
once and the loop is closed with the other reads still pending. Those tasks are
destroyed later, whenever the garbage collector gets to them; closing their
coroutines then raises inside Orbax's ``except BaseException`` (it wraps the
``GeneratorExit`` in a new ``Exception`` with a whole TensorStore spec), and
Python prints each as "Exception ignored in: <coroutine ...>": thousands of
lines for one truncated file, at a moment that depends on the collector.

``draining()`` makes the loops created inside it cancel their pending tasks and
wait for them before they close, so a failed restore has ended every read when
it returns: nothing is left for the collector to report. A task that failed after
nothing awaited it any more is retrieved at close, so asyncio does not log "Task
exception was never retrieved" when it is collected. A TensorStore read
that completes after its loop closed is dropped instead of raising "Event loop
is closed" in TensorStore's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Iterator

# How long a closing loop waits for its cancelled tasks (they end at their next await).
DRAIN_TIMEOUT_S = 30.0


class DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop whose ``close`` cancels the tasks still pending and waits for them."""

  def __init__(self) -> None:
    super().__init__()
    # Every task made on this loop: one that failed while nothing awaited it any more (a
    # read ending after its gather had raised) is retrieved at close, or asyncio logs
    # "Task exception was never retrieved" when the collector gets to it.
    self._made: list[asyncio.Task] = []
    self.set_task_factory(self._make_task)

  def _make_task(self, loop, coro, **kwargs):
    task = asyncio.Task(coro, loop=loop, **kwargs)
    self._made.append(task)
    return task

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      # Cancelling can start new tasks (cleanup in Orbax's handlers): drain until none is left.
      for _ in range(100):
        pending = asyncio.all_tasks(self)
        if not pending:
          break
        for task in pending:
          task.cancel()
        _, stuck = self.run_until_complete(asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S))
        if stuck:  # Past the timeout: close anyway rather than hang the run.
          break
      for task in self._made:
        if task.done() and not task.cancelled():
          task.exception()
      self._made.clear()
    super().close()

  def call_soon_threadsafe(self, callback, *args, context=None):
    """Drops a callback that arrives after the loop closed: TensorStore completing a read
    that was cancelled, which nothing waits for any more (asyncio would raise "Event loop
    is closed" in TensorStore's thread, printed as an unraisable error)."""
    try:
      return super().call_soon_threadsafe(callback, *args, context=context)
    except RuntimeError:
      if self.is_closed():
        return None
      raise


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return DrainingLoop()


@contextlib.contextmanager
def draining() -> Iterator[None]:
  """Event loops created inside (Orbax's, in any thread) drain their tasks before closing."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)
