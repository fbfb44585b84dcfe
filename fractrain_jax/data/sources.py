"""Where a run's data comes from: one registry of data-source kinds.

A kind (``Source``) owns everything about the names it accepts
(``config.data.dataset``): which names are its (``claims``), what makes one
unusable (``check``), what the data is for (``task``: images and labels, or
the LM's token windows), whether it is held on the device or streamed
(``streamed``), how it is loaded from a config (``load``), and the
normalization statistics of its images. The kinds this package registers
(``tfds``, ``tfds-stream``, ``folder``, ``text``) live in ``kinds.py``, which
imports their loaders; this registry imports none, so a loader may ask it
(``is_streamed``) without an import circle.

``config.data.normalization`` overrides a source's own statistics
(``NORMALIZATIONS``): SPEC section 6's CIFAR-10 figures or ImageNet's for any
image data, or figures measured on the training split of in-memory data.

``find(dataset)`` is the one place a name is checked; the loaders, the config
check and the trainer all ask it. A new kind is one subclass and one
``register`` call (docs/DESIGN.md, "How to add a dataset").
"""

from __future__ import annotations

import pathlib
from typing import Any

import ml_collections

from fractrain_jax.data.common import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from fractrain_jax.errors import ConfigError

TASKS = ("classify", "lm")
# config.data.normalization: the source's own statistics, or one of these for any image data.
PUBLISHED = {"cifar10": (CIFAR_MEAN, CIFAR_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
MEASURED = "measured"
NORMALIZATIONS = ("auto",) + tuple(PUBLISHED) + (MEASURED,)


class Source:
  """A kind of data source; subclasses set the attributes and give ``claims`` and ``load``.

  forms: the names it accepts, as error messages show them ("cifar10", "folder:PATH").
  task: "classify" (images and labels) or "lm" (token windows for the LM).
  streamed: read batch by batch on the host (False: held on the device).
  """

  kind: str = ""
  forms: tuple[str, ...] = ()
  task: str = "classify"
  streamed: bool = False
  # Its own normalization: a key of PUBLISHED, or MEASURED on the training split.
  statistics: str = MEASURED

  def claims(self, dataset: str) -> bool:
    raise NotImplementedError

  def check(self, dataset: str) -> None:
    """Refuses (ConfigError) a name this kind claims but cannot use."""

  def canonical(self, dataset: str) -> str:
    """One spelling per dataset, for the run's identity (a path made absolute)."""
    return dataset

  def load(self, config: ml_collections.ConfigDict) -> Any:
    """The data of ``config.data.dataset``: an object with ``num_classes``, ``mean``, ``std``,
    ``input_shape`` (one example's), ``test_batches(batch_size)``, ``describe()``, and ``train_arrays()`` (held on the
    device) or ``train_batches(batch_size, seed, start_step)`` (streamed)."""
    raise NotImplementedError


def check_batch(config: ml_collections.ConfigDict, available: int, what: str) -> None:
  """Refuses a batch larger than the training examples ``available`` (``what`` names them)."""
  if available < config.train.batch_size:
    raise ConfigError(f"config.train.batch_size={config.train.batch_size} exceeds the "
                      f"{available} {what}")


class Named(Source):
  """A kind whose names are a fixed list."""

  names: tuple[str, ...] = ()

  @property
  def forms(self) -> tuple[str, ...]:  # type: ignore[override]
    return self.names

  def claims(self, dataset: str) -> bool:
    return dataset in self.names


class Prefixed(Source):
  """A kind whose names are ``PREFIX:PATH``; ``layout`` says what PATH must hold."""

  prefix: str = ""
  layout: str = ""

  @property
  def forms(self) -> tuple[str, ...]:  # type: ignore[override]
    return (self.prefix + "PATH",)

  def claims(self, dataset: str) -> bool:
    return dataset.startswith(self.prefix)

  def check(self, dataset: str) -> None:
    if not dataset[len(self.prefix):]:
      raise ConfigError(f"dataset={dataset!r} names no folder: use {self.prefix}PATH with "
                        f"{self.layout}")

  def canonical(self, dataset: str) -> str:
    """``./data/cifar10/``, ``data/cifar10`` and its absolute path are one dataset."""
    return self.prefix + str(pathlib.Path(dataset[len(self.prefix):]).expanduser().resolve())


def normalization(source: Source, config: ml_collections.ConfigDict) -> str:
  """The statistics a run normalizes with: ``config.data.normalization``, or the source's own."""
  choice = config.data.normalization
  return source.statistics if choice == "auto" else choice


_REGISTRY: list[Source] = []


def register(source: Source) -> Source:
  """Adds a kind; it is asked before the ones registered earlier (so it may narrow them)."""
  if not source.kind:
    raise ValueError(f"{type(source).__name__} has no kind")
  if source.task not in TASKS:
    raise ValueError(f"{source.kind}: task={source.task!r}; expected one of {TASKS}")
  unregister(source.kind)
  _REGISTRY.insert(0, source)
  return source


def unregister(kind: str) -> None:
  _REGISTRY[:] = [s for s in _REGISTRY if s.kind != kind]


def accepted() -> tuple[str, ...]:
  """Every accepted form of a dataset name, in registration order."""
  return tuple(form for source in reversed(_REGISTRY) for form in source.forms)


def find(dataset: str) -> Source:
  """The kind that accepts ``dataset``, its name checked; ConfigError listing the forms otherwise."""
  if not isinstance(dataset, str):
    raise ConfigError(f"dataset={dataset!r} is not a string; accepted: {', '.join(accepted())}")
  for source in _REGISTRY:
    if source.claims(dataset):
      source.check(dataset)
      return source
  raise ConfigError(f"unknown dataset {dataset!r}; accepted: {', '.join(accepted())}")


def load(config: ml_collections.ConfigDict) -> Any:
  """The data of ``config.data.dataset``, loaded by its kind."""
  return find(config.data.dataset).load(config)


def is_text(dataset: str) -> bool:
  """True for the LM's token windows (``text:PATH``); refuses an unknown name."""
  return find(dataset).task == "lm"


def is_streamed(dataset: str) -> bool:
  """True for data read batch by batch (imagenet2012); refuses an unknown name."""
  return find(dataset).streamed

