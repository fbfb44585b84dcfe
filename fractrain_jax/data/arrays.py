"""CIFAR-sized datasets held in host memory as NumPy arrays.

``cifar10``, ``cifar100`` and ``folder:PATH`` (an image folder, read by
:mod:`fractrain_jax.data.folder`) are loaded once into NumPy (uint8 NHWC
images, int32 labels) by :func:`load_arrays`, optionally cut to seeded,
class-balanced subsets (:func:`subset_indices`). The train step then gathers
and augments its batches on the device (:mod:`fractrain_jax.data.augment`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fractrain_jax.errors import ConfigError
from fractrain_jax.data.common import (
    CIFAR_MEAN, CIFAR_STD, FOLDER_PREFIX, Float3, _tfds)
from fractrain_jax.data.tfds_prepare import prepared_builder
from fractrain_jax.data.folder import _load_folder
from fractrain_jax.data.sources import is_streamed

# Batches read from tfds when loading a whole split into memory.
_READ_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class ArrayData:
  """A CIFAR-sized dataset held in host memory."""

  train_images: np.ndarray  # uint8 (N, H, W, 3)
  train_labels: np.ndarray  # int32 (N,)
  test_images: np.ndarray  # uint8 (M, H, W, 3)
  test_labels: np.ndarray  # int32 (M,)
  num_classes: int
  mean: Float3
  std: Float3

  def __post_init__(self):
    for split in ("train", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{split}_images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{split}_labels must be int32 ({images.shape[0]},), got "
            f"{labels.dtype} {labels.shape}")

  @property
  def num_train(self) -> int:
    return int(self.train_labels.shape[0])

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One example's shape, ``(H, W, 3)``: what a model of the user's own is attached with."""
    return tuple(self.train_images.shape[1:])

  def describe(self) -> str:
    """One line for the run's log."""
    _, h, w, _ = self.train_images.shape
    return (f"{self.num_train} training and {self.num_test} test images of {h}x{w}, "
            f"{self.num_classes} classes")

  @property
  def num_test(self) -> int:
    return int(self.test_labels.shape[0])

  def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """What the train step gathers its batches from (the same call as ``TextData``'s)."""
    return self.train_images, self.train_labels

  def test_batches(self, batch_size: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """All test examples in order as `(images, labels, valid)` batches of `batch_size`.

    The last batch is padded (zero images, label 0) so that every batch has one
    shape, so one compile; `valid` marks the real examples. The same contract
    as `StreamData.test_batches`.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    images, labels = self.test_images, self.test_labels
    for start in range(0, len(images), batch_size):
      xb, yb = images[start:start + batch_size], labels[start:start + batch_size]
      valid = np.arange(batch_size) < len(xb)
      pad = batch_size - len(xb)
      if pad:
        xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
        yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
      yield xb, yb, valid


def subset_indices(labels: np.ndarray, size: int,
                   seed: int | Sequence[int]) -> np.ndarray:
  """Sorted indices of a seeded, class-balanced subset of `size` examples.

  Class counts differ by at most one, except where a class runs out of
  examples (the others then fill in). Within a class the examples are a
  seeded random draw; which classes get the extra example when `size` is not
  a multiple of the class count is seeded too. Same `(labels, size, seed)`,
  same subset.
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  if not 0 < size <= n:
    raise ValueError(f"subset size {size} must be in 1..{n} (the number of examples)")
  perm = np.random.default_rng(seed).permutation(n)
  permuted = labels[perm]
  # Rank of each example among those of its class, in permuted order.
  by_class = np.argsort(permuted, kind="stable")
  sorted_labels = permuted[by_class]
  rank = np.empty(n, np.int64)
  rank[by_class] = np.arange(n) - np.searchsorted(sorted_labels, sorted_labels)
  # All rank-0 examples (one per class) first, then rank 1, ...; ties by permutation.
  order = np.lexsort((np.arange(n), rank))
  return np.sort(perm[order[:size]])


def _check_subset(value: int, what: str) -> None:
  if not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{what}={value!r} must be an int >= 0 (0 = all examples)")


def _take_subset(images: np.ndarray, labels: np.ndarray, size: int,
                 seed: tuple[int, int], what: str) -> tuple[np.ndarray, np.ndarray]:
  if size == 0:
    return images, labels
  if size > labels.shape[0]:
    raise ConfigError(
        f"{what}={size} exceeds the {labels.shape[0]} examples of the split "
        "(use 0 for all of them)")
  idx = subset_indices(labels, size, seed)
  return images[idx], labels[idx]


def _read_tfds_split(builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All (image, label) pairs of a tfds split, as uint8 / int32 arrays."""
  tfds = _tfds()
  ds = builder.as_dataset(split=split, as_supervised=True).batch(_READ_BATCH)
  images, labels = [], []
  for x, y in tfds.as_numpy(ds):
    images.append(x)
    labels.append(y)
  if not images:
    raise ValueError(f"split {split!r} of {builder.name} holds no examples")
  return (np.concatenate(images).astype(np.uint8),
          np.concatenate(labels).astype(np.int32))


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[Float3, Float3]:
  """Per-channel mean and standard deviation of uint8 NHWC ``images``, in [0, 1] units.

  Summed in float64 over chunks of images, so no float copy of the whole set is made.
  """
  if images.size == 0:
    raise ValueError("no images to measure statistics on")
  total = np.zeros(3, np.float64)
  squares = np.zeros(3, np.float64)
  for start in range(0, len(images), chunk):
    x = images[start:start + chunk].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    total += x.sum(axis=0)
    squares += np.square(x).sum(axis=0)
  n = images.size // images.shape[-1]
  mean = total / n
  std = np.sqrt(np.maximum(squares / n - np.square(mean), 0.0))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_arrays(dataset: str, *, data_dir: str | None = None, download: bool = False,
                train_subset: int = 0, test_subset: int = 0, seed: int = 0,
                measure_stats: bool = False) -> ArrayData:
  """Loads cifar10, cifar100 or folder:PATH into memory.

  Args:
    dataset: "cifar10", "cifar100" or "folder:PATH".
    data_dir: where tfds keeps prepared datasets (None: the tfds default).
    download: let tfds download and prepare a dataset that is not there.
    train_subset: keep this many training examples (0 = all): a seeded,
      class-balanced subset (see `subset_indices`).
    test_subset: the same for the test split.
    seed: seed of the subsets; the train and test draws are independent.
    measure_stats: normalize with the per-channel mean and standard deviation
      of the whole training split (before any subset) instead of the CIFAR
      statistics of SPEC section 6.

  Returns:
    The dataset with its normalization statistics.
  """
  if is_streamed(dataset):
    raise ValueError(f"{dataset} is streamed, not held in memory: use StreamData")
  _check_subset(train_subset, "train_subset")
  _check_subset(test_subset, "test_subset")
  if dataset.startswith(FOLDER_PREFIX):
    train, test, num_classes = _load_folder(dataset)
  else:
    builder = prepared_builder(dataset, data_dir, download)
    train = _read_tfds_split(builder, "train")
    test = _read_tfds_split(builder, "test")
    num_classes = builder.info.features["label"].num_classes
  mean, std = channel_stats(train[0]) if measure_stats else (CIFAR_MEAN, CIFAR_STD)
  train = _take_subset(*train, train_subset, (seed, 0), "train_subset")
  test = _take_subset(*test, test_subset, (seed, 1), "test_subset")
  return ArrayData(train[0], train[1], test[0], test[1], num_classes=num_classes,
                   mean=mean, std=std)
