"""Errors that mean "the user asked for something that cannot be done", not "the code is broken".

Entry points print these as one line (``error: ...``) and exit 2; anything
else keeps its traceback. Each subclasses the built-in type it replaces, so
``except ValueError`` and ``pytest.raises(FileNotFoundError)`` still catch
them. ``first_line``, ``one_line`` and ``os_reason`` are how any error is
shortened to such a line.
"""

from __future__ import annotations

import os


class UserError(Exception):
  """A mistake in the command, config, data or workdir; the message says what to do."""


class ConfigError(UserError, ValueError):
  """A config value that is not accepted (its key, the value, what would be)."""


class DataError(UserError, FileNotFoundError):
  """A dataset that is missing, empty or unreadable (the path and what to do)."""


class DataFormatError(UserError, ValueError):
  """A dataset whose contents cannot be used (an empty class folder, an unreadable image)."""


class ResumeError(UserError, ValueError):
  """A workdir whose checkpoints belong to another run, or none of which restores."""


class NonFiniteError(UserError, FloatingPointError):
  """Training diverged: a loss became nan or inf (the step and the checkpoint kept)."""


class StorageError(UserError, OSError):
  """A file or folder of the run cannot be written (permissions, a full disk, a quota)."""


class WorkdirInUseError(UserError, RuntimeError):
  """Another process is running in the workdir (its pid and host are named)."""


def first_line(err: BaseException) -> str:
  """The first line of an error's message ("" when it has none)."""
  text = str(err).strip().splitlines()
  return text[0] if text else ""


def one_line(err: BaseException, limit: int | None = 300) -> str:
  """An exception as ``Type: first line``, at most ``limit`` characters (None: whole)."""
  return f"{type(err).__name__}: {first_line(err)}"[:limit]


def os_reason(err: OSError) -> str:
  """The OS's words for an OSError (``No space left on device``), else its message."""
  return os.strerror(err.errno) if err.errno else str(err)
