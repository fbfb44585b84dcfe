"""Input pipeline: CIFAR-sized data held as arrays, ImageNet streamed by tf.data.

Two shapes of data, chosen by the dataset name:

* ``cifar10``, ``cifar100`` and ``folder:PATH`` (an image folder with
  ``PATH/train/<class>/`` and ``PATH/test/<class>/``) are loaded once into
  NumPy (uint8 NHWC images, int32 labels) by :func:`load_arrays`. The train
  step gathers its batch with :func:`batch_indices` and augments it on the
  device with :func:`augment` (pad 4 + random crop, random flip, normalize;
  SPEC section 6), so the host does no per-step work and the data order is a
  pure function of ``(key, step)``: a resumed run sees the same batches.
* ``imagenet2012`` is too big for memory and streams through tf.data
  (:class:`StreamData`), with a deterministic order per
  ``(seed, epoch)`` and a resume point; :func:`prefetch_to_device` overlaps
  the host-to-device copy with the step.

TensorFlow (and tensorflow-datasets, which pulls it in) is imported only by
the functions that read data, and is kept off the GPUs so that it never takes
accelerator memory from JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# SPEC section 6; the paper uses the CIFAR-10 statistics for every CIFAR-sized set.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FOLDER_PREFIX = "folder:"
ARRAY_DATASETS = ("cifar10", "cifar100")
STREAMED_DATASETS = ("imagenet2012",)
DATASETS = ARRAY_DATASETS + STREAMED_DATASETS + (FOLDER_PREFIX + "PATH",)

# ImageNet evaluation: resize the shorter side to 256, center-crop 224.
_EVAL_RESIZE_RATIO = 256 / 224
# Batches read from tfds when loading a whole split into memory.
_READ_BATCH = 4096

Float3 = tuple[float, float, float]


# ---------------------------------------------------------------------------
# Dataset names.
# ---------------------------------------------------------------------------


def _check_name(dataset: str) -> None:
  """Refuses a dataset name that is not one of DATASETS."""
  if not isinstance(dataset, str):
    raise ValueError(f"dataset={dataset!r} is not a string; accepted: {DATASETS}")
  if dataset.startswith(FOLDER_PREFIX):
    if not dataset[len(FOLDER_PREFIX):]:
      raise ValueError(
          f"dataset={dataset!r} names no folder: use folder:PATH with "
          "PATH/train/<class>/ and PATH/test/<class>/")
    return
  if dataset not in ARRAY_DATASETS + STREAMED_DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; accepted: {', '.join(DATASETS)}")


def is_streamed(dataset: str) -> bool:
  """True for datasets read batch by batch (imagenet2012), False for in-memory ones."""
  _check_name(dataset)
  return dataset in STREAMED_DATASETS


# ---------------------------------------------------------------------------
# TensorFlow and tensorflow-datasets, imported on first use.
# ---------------------------------------------------------------------------


@functools.cache
def _tf() -> Any:
  """Imports TensorFlow with the GPUs hidden from it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    # TF was initialized elsewhere first; its device list can no longer change.
    logging.warning("TensorFlow was already initialized; could not hide GPUs from it.")
  return tf


def _tfds() -> Any:
  _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def _tfds_is_mocked(tfds: Any) -> bool:
  """True inside `tfds.testing.mock_data`, which serves random examples.

  mock_data replaces `DatasetBuilder.as_dataset` with its own function; the
  builder then reads nothing from disk, so "not prepared" means nothing.
  """
  as_dataset = tfds.core.DatasetBuilder.as_dataset
  return getattr(as_dataset, "__module__", "") == "tensorflow_datasets.testing.mocking"


def _prepared_builder(name: str, data_dir: str | None, download: bool) -> Any:
  """The tfds builder of `name`, prepared; refuses fast when it is not there."""
  tfds = _tfds()
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared() or _tfds_is_mocked(tfds):
    return builder
  if download:
    builder.download_and_prepare()
    return builder
  # Refuse here: letting tfds try would start minutes of download retries offline.
  where = data_dir if data_dir is not None else f"{builder.data_dir_root} (the tfds default)"
  raise FileNotFoundError(
      f"dataset {name!r} is not prepared in data_dir={where} (looked for "
      f"{builder.data_dir}) and download is off. Either point to where it is "
      "prepared with --config.data.data_dir=..., let tfds download and prepare "
      "it with --config.data.download=True, or train on an image folder with "
      "--config.data.dataset=folder:PATH (PATH/train/<class>/, PATH/test/<class>/).")


# ---------------------------------------------------------------------------
# In-memory (CIFAR-sized) data.
# ---------------------------------------------------------------------------


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
  def num_test(self) -> int:
    return int(self.test_labels.shape[0])


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
    raise ValueError(
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


def _list_dirs(path: str) -> list[str]:
  gfile = _tf().io.gfile
  return sorted(e.rstrip("/") for e in gfile.listdir(path)
                if gfile.isdir(os.path.join(path, e)))


def _folder_classes(root: str, spec: str) -> list[str]:
  """Checks the folder layout; returns the class names (sorted subfolders)."""
  gfile = _tf().io.gfile
  layout = f"expected {root}/train/<class>/*.png|jpg and {root}/test/<class>/*.png|jpg"
  if not gfile.isdir(root):
    raise FileNotFoundError(f"dataset {spec!r}: folder {root} does not exist; {layout}")
  classes = {}
  for split in ("train", "test"):
    split_dir = os.path.join(root, split)
    if not gfile.isdir(split_dir):
      raise FileNotFoundError(
          f"dataset {spec!r}: folder {split_dir} does not exist; {layout}")
    classes[split] = _list_dirs(split_dir)
    if not classes[split]:
      raise ValueError(f"dataset {spec!r}: {split_dir} has no class subfolders; {layout}")
  if classes["train"] != classes["test"]:
    only_train = sorted(set(classes["train"]) - set(classes["test"]))
    only_test = sorted(set(classes["test"]) - set(classes["train"]))
    raise ValueError(
        f"dataset {spec!r}: train and test must have the same classes; only in "
        f"train: {only_train}, only in test: {only_test}")
  return classes["train"]


def _read_folder_split(builder: Any, split: str,
                       spec: str) -> tuple[np.ndarray, np.ndarray]:
  tfds = _tfds()
  images, labels, files = [], [], []
  for ex in tfds.as_numpy(builder.as_dataset(split=split)):
    images.append(ex["image"])
    labels.append(ex["label"])
    files.append(ex["image/filename"].decode())
  if not images:
    raise ValueError(f"dataset {spec!r}: the {split} split holds no .png/.jpg/.jpeg images")
  shapes = collections.defaultdict(list)
  for image, file in zip(images, files):
    shapes[image.shape].append(file)
  if len(shapes) > 1:
    found = "; ".join(f"{h}x{w} ({len(f)} images, e.g. {f[0]})"
                      for (h, w, _), f in sorted(shapes.items()))
    raise ValueError(f"dataset {spec!r}: images must all have one size, found {found}")
  return np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)


def _load_folder(spec: str) -> tuple[tuple[np.ndarray, np.ndarray],
                                     tuple[np.ndarray, np.ndarray], int]:
  root = os.path.expanduser(spec[len(FOLDER_PREFIX):])
  classes = _folder_classes(root, spec)
  tfds = _tfds()
  # shape (None, None, 3): grey or RGBA files decode to RGB like the rest.
  builder = tfds.ImageFolder(root, shape=(None, None, 3))
  names = builder.info.features["label"].names
  if names != classes:
    # ImageFolder numbers the classes of every split folder under root together.
    raise ValueError(
        f"dataset {spec!r}: other folders under {root} add classes "
        f"{sorted(set(names) - set(classes))}; keep only train/ and test/ there")
  train = _read_folder_split(builder, "train", spec)
  test = _read_folder_split(builder, "test", spec)
  if train[0].shape[1:] != test[0].shape[1:]:
    raise ValueError(
        f"dataset {spec!r}: images must all have one size, train has "
        f"{train[0].shape[1:3]} and test {test[0].shape[1:3]}")
  return train, test, len(classes)


def load_arrays(dataset: str, *, data_dir: str | None = None, download: bool = False,
                train_subset: int = 0, test_subset: int = 0, seed: int = 0) -> ArrayData:
  """Loads cifar10, cifar100 or folder:PATH into memory.

  Args:
    dataset: "cifar10", "cifar100" or "folder:PATH".
    data_dir: where tfds keeps prepared datasets (None: the tfds default).
    download: let tfds download and prepare a dataset that is not there.
    train_subset: keep this many training examples (0 = all): a seeded,
      class-balanced subset (see `subset_indices`).
    test_subset: the same for the test split.
    seed: seed of the subsets; the train and test draws are independent.

  Returns:
    The dataset, normalized with the CIFAR statistics (SPEC section 6).
  """
  _check_name(dataset)
  if is_streamed(dataset):
    raise ValueError(f"{dataset} is streamed, not held in memory: use StreamData")
  _check_subset(train_subset, "train_subset")
  _check_subset(test_subset, "test_subset")
  if dataset.startswith(FOLDER_PREFIX):
    train, test, num_classes = _load_folder(dataset)
  else:
    builder = _prepared_builder(dataset, data_dir, download)
    train = _read_tfds_split(builder, "train")
    test = _read_tfds_split(builder, "test")
    num_classes = builder.info.features["label"].num_classes
  train = _take_subset(*train, train_subset, (seed, 0), "train_subset")
  test = _take_subset(*test, test_subset, (seed, 1), "test_subset")
  return ArrayData(train[0], train[1], test[0], test[1], num_classes=num_classes,
                   mean=CIFAR_MEAN, std=CIFAR_STD)


# ---------------------------------------------------------------------------
# On-device batch order and augmentation (jit-friendly, pure).
# ---------------------------------------------------------------------------


def batch_indices(key: jax.Array, step: int | jax.Array, num_examples: int,
                  batch_size: int) -> jax.Array:
  """Indices of the examples of training step `step`, int32 `(batch_size,)`.

  Epoch `e = step // (num_examples // batch_size)` visits the permutation
  `jax.random.permutation(fold_in(key, e), num_examples)` in consecutive
  slices; the last `num_examples % batch_size` examples of each permutation
  are dropped. `step` may be traced.
  """
  if batch_size < 1 or num_examples < batch_size:
    raise ValueError(
        f"batch_size={batch_size} must be in 1..num_examples={num_examples}")
  steps_per_epoch = num_examples // batch_size
  step = jnp.asarray(step, jnp.int32)
  perm = jax.random.permutation(jax.random.fold_in(key, step // steps_per_epoch),
                                num_examples)
  start = (step % steps_per_epoch) * batch_size
  return jax.lax.dynamic_slice_in_dim(perm, start, batch_size).astype(jnp.int32)


def _check_uint8(images: jax.Array) -> None:
  if images.dtype != jnp.uint8 or images.ndim != 4:
    raise ValueError(
        f"images must be uint8 (batch, height, width, channels), got "
        f"{images.dtype} {images.shape}")


def normalize(images_uint8: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """float32 `(x / 255 - mean) / std` per channel (evaluation input)."""
  _check_uint8(images_uint8)
  x = images_uint8.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def sample_crop_flip(key: jax.Array, batch: int,
                     pad: int = 4) -> tuple[jax.Array, jax.Array]:
  """Per-sample crops and flips for `crop_flip`.

  Returns offsets `(batch, 2)` int32 (row, col), each in 0..2*pad, and flips
  `(batch,)` bool.
  """
  if pad < 0:
    raise ValueError(f"pad={pad} must be >= 0")
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1, jnp.int32)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
  return offsets, flips


def crop_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array,
              pad: int = 4) -> jax.Array:
  """Zero-pads by `pad`, crops each image back to its size at its offset, flips.

  Image `i` of the result is `padded[i, r:r+H, c:c+W]` with
  `(r, c) = offsets[i]`, mirrored left-right where `flips[i]`.
  """
  _, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  # Index gathers rather than a vmapped dynamic_slice: a vmap whose inputs are
  # sharded differently (batch-sharded images, replicated offsets) is refused
  # on meshes with explicit axes; take_along_axis works on any mesh.
  rows = offsets[:, :1] + jnp.arange(h)
  cols = offsets[:, 1:] + jnp.where(flips[:, None], jnp.arange(w)[::-1], jnp.arange(w))
  crops = jnp.take_along_axis(padded, rows[:, :, None, None], axis=1)
  return jnp.take_along_axis(crops, cols[:, None, :, None], axis=2)


def augment(key: jax.Array, images_uint8: jax.Array, mean: Sequence[float],
            std: Sequence[float], *, pad: int = 4) -> jax.Array:
  """Training input (SPEC section 6): pad + random crop, random flip, normalize.

  Padding is zeros in pixel space (before normalizing), as torchvision's
  RandomCrop(padding=4) does. Returns float32 of the input's shape; the crops
  and flips are those of `sample_crop_flip(key, batch, pad)`.
  """
  _check_uint8(images_uint8)
  offsets, flips = sample_crop_flip(key, images_uint8.shape[0], pad)
  return normalize(crop_flip(images_uint8, offsets, flips, pad), mean, std)


# ---------------------------------------------------------------------------
# Streamed (ImageNet) data.
# ---------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
  """A 63-bit tf.data seed for (seed, epoch)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def _split_size(builder: Any, split: str) -> int:
  """Examples in a split, from the dataset's cardinality (also right under mock_data)."""
  n = int(builder.as_dataset(split=split).cardinality())
  if n < 0:
    raise ValueError(f"the size of split {split!r} of {builder.name} is unknown")
  return n


class StreamData:
  """A tfds image-classification dataset read batch by batch (imagenet2012).

  Train batches: random-resized crop (area 8-100%, aspect 3/4-4/3) resized to
  `image_size`, random flip, normalize. Test batches: shorter side resized to
  `image_size * 256 / 224`, center crop `image_size`, normalize. Both are
  float32 `(batch, image_size, image_size, 3)` with int32 labels.
  """

  train_split = "train"
  test_split = "validation"

  def __init__(self, dataset: str, *, data_dir: str | None = None, download: bool = False,
               image_size: int = 224, shuffle_buffer: int = 10_000):
    """Opens `dataset` (prepared in `data_dir`, or downloaded if `download`).

    `image_size` is the side of the train crops and of the eval center crop
    (224 in the paper; tests use small values on tiny mock images).
    `shuffle_buffer` is the tf.data shuffle buffer, in examples.
    """
    _check_name(dataset)
    if not is_streamed(dataset):
      raise ValueError(f"{dataset} is held in memory, not streamed: use load_arrays")
    if image_size < 1 or shuffle_buffer < 1:
      raise ValueError(
          f"image_size={image_size} and shuffle_buffer={shuffle_buffer} must be >= 1")
    self.builder = _prepared_builder(dataset, data_dir, download)
    self.num_classes: int = self.builder.info.features["label"].num_classes
    self.num_train = _split_size(self.builder, self.train_split)
    self.num_test = _split_size(self.builder, self.test_split)
    self.image_size = image_size
    self.shuffle_buffer = shuffle_buffer
    self.mean: Float3 = IMAGENET_MEAN
    self.std: Float3 = IMAGENET_STD

  def steps_per_epoch(self, batch_size: int) -> int:
    """Training steps per epoch (the last partial batch is dropped)."""
    if not 1 <= batch_size <= self.num_train:
      raise ValueError(f"batch_size={batch_size} must be in 1..{self.num_train}")
    return self.num_train // batch_size

  def _normalize(self, image: Any) -> Any:
    tf = _tf()
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(self.mean)) / tf.constant(self.std)

  def _train_example(self, index: Any, example: Any, *, seed: int, epoch: int) -> Any:
    tf = _tf()
    jpeg, label = example
    # Randomness from (seed, epoch, position in the epoch): a resumed stream
    # that skipped to a position augments exactly as a fresh one did there.
    example_seed = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, epoch], tf.int64), index)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(example_seed))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(jpeg),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    # Decoding only the crop window saves most of the JPEG decode.
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(image, [self.image_size, self.image_size],
                            method="bilinear", antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return self._normalize(image), tf.cast(label, tf.int32)

  def _test_example(self, jpeg: Any, label: Any) -> Any:
    tf = _tf()
    image = tf.io.decode_jpeg(jpeg, channels=3)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    short = round(self.image_size * _EVAL_RESIZE_RATIO)
    new_hw = tf.cast(tf.round(hw * short / tf.reduce_min(hw)), tf.int32)
    new_hw = tf.maximum(new_hw, self.image_size)
    image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    top = (new_hw[0] - self.image_size) // 2
    left = (new_hw[1] - self.image_size) // 2
    image = image[top:top + self.image_size, left:left + self.image_size]
    image = tf.ensure_shape(image, [self.image_size, self.image_size, 3])
    return self._normalize(image), tf.cast(label, tf.int32)

  def _read(self, split: str, *, shuffle_seed: int | None = None) -> Any:
    tfds = _tfds()
    return self.builder.as_dataset(
        split=split,
        as_supervised=True,
        shuffle_files=shuffle_seed is not None,
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
        # Raw JPEG bytes: skipped examples are never decoded, and the train
        # crop decodes only its window.
        decoders={"image": tfds.decode.SkipDecoding()})

  def train_epoch(self, batch_size: int, seed: int, epoch: int,
                  skip_batches: int = 0) -> Any:
    """The tf.data.Dataset of one epoch's training batches, from batch `skip_batches` on."""
    tf = _tf()
    steps = self.steps_per_epoch(batch_size)
    if not 0 <= skip_batches <= steps:
      raise ValueError(f"skip_batches={skip_batches} must be in 0..{steps}")
    epoch_seed = _epoch_seed(seed, epoch)
    ds = self._read(self.train_split, shuffle_seed=epoch_seed)
    ds = ds.shuffle(self.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.take(steps * batch_size).enumerate().skip(skip_batches * batch_size)
    ds = ds.map(functools.partial(self._train_example, seed=seed, epoch=epoch),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

  def train_batches(self, batch_size: int, seed: int,
                    start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless training batches `(images, labels)` from step `start_step` on.

    Step `s` is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`,
    and each epoch's order is fixed by `(seed, epoch)`: resuming at step `k`
    yields what a fresh iterator yields as its k-th batch.
    """
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0")
    steps = self.steps_per_epoch(batch_size)
    first_epoch, skip = divmod(start_step, steps)
    for epoch in itertools.count(first_epoch):
      ds = self.train_epoch(batch_size, seed, epoch, skip if epoch == first_epoch else 0)
      yield from ds.as_numpy_iterator()

  def test_batches(
      self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """All test examples in order as `(images, labels, valid)` batches of `batch_size`.

    The last batch is padded to full size (zero images, label 0) so that every
    batch has one shape; `valid` (bool `(batch,)`) marks the real examples.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    tf = _tf()
    ds = self._read(self.test_split)
    ds = ds.map(self._test_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(lambda image, label: (image, label, True))
    padding = (-self.num_test) % batch_size
    if padding:
      blank = (tf.zeros([self.image_size, self.image_size, 3], tf.float32),
               tf.constant(0, tf.int32), False)
      ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()


# ---------------------------------------------------------------------------
# Host-to-device prefetch.
# ---------------------------------------------------------------------------


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
