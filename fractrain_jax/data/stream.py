"""ImageNet streamed by tf.data: :class:`StreamData`.

``imagenet2012`` is too big for memory and is read batch by batch from tfds,
with the augmentation done by tf.data on the host. Each epoch's order and
augmentation are a deterministic function of ``(seed, epoch)``, and a stream
can start at any step (a resume point) and yield what a fresh one yields
there.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from fractrain_jax.data.common import (
    IMAGENET_MEAN, IMAGENET_STD, Float3, _tf, _tfds)
from fractrain_jax.data.tfds_prepare import prepared_builder
from fractrain_jax.data.sources import is_streamed

# ImageNet evaluation: resize the shorter side to 256, center-crop 224.
_EVAL_RESIZE_RATIO = 256 / 224


def _epoch_seed(seed: int, epoch: int) -> int:
  """A 63-bit tf.data seed for (seed, epoch)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def _split_size(builder: Any, split: str) -> int:
  """Examples in a split, from the dataset's cardinality (also right under mock_data)."""
  n = int(builder.as_dataset(split=split).cardinality())
  if n < 0:
    raise ValueError(f"the size of split {split!r} of {builder.name} is unknown")
  return n


def _rows_only(ds: Any, batch_size: int, rows: slice | None) -> tuple[Any, int]:
  """Keeps the ``(position, example)`` pairs in ``rows`` of each batch of ``batch_size``;
  returns the dataset and the rows per batch."""
  if rows is None or (rows.start, rows.stop) == (0, batch_size):
    return ds, batch_size
  start, stop = rows.start, rows.stop
  return ds.filter(lambda i, _: (i % batch_size >= start) & (i % batch_size < stop)), stop - start


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
               image_size: int = 224, shuffle_buffer: int = 10_000,
               mean: Float3 = IMAGENET_MEAN, std: Float3 = IMAGENET_STD):
    """Opens `dataset` (prepared in `data_dir`, or downloaded if `download`).

    `image_size` is the side of the train crops and of the eval center crop
    (224 in the paper; tests use small values on tiny mock images).
    `shuffle_buffer` is the tf.data shuffle buffer, in examples.
    `mean`, `std`: the per-channel normalization of every batch.
    """
    self.name = dataset
    if not is_streamed(dataset):
      raise ValueError(f"{dataset} is held in memory, not streamed: use load_arrays")
    if image_size < 1 or shuffle_buffer < 1:
      raise ValueError(
          f"image_size={image_size} and shuffle_buffer={shuffle_buffer} must be >= 1")
    self.builder = prepared_builder(dataset, data_dir, download)
    self.num_classes: int = self.builder.info.features["label"].num_classes
    self.num_train = _split_size(self.builder, self.train_split)
    self.num_test = _split_size(self.builder, self.test_split)
    self.image_size = image_size
    self.shuffle_buffer = shuffle_buffer
    self.mean: Float3 = tuple(mean)
    self.std: Float3 = tuple(std)

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One example's shape: an ``image_size`` square crop."""
    return (self.image_size, self.image_size, 3)

  def describe(self) -> str:
    """One line for the run's log."""
    return f"{self.name} streamed through tf.data, {self.num_classes} classes"

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
                  skip_batches: int = 0, rows: slice | None = None) -> Any:
    """The tf.data.Dataset of one epoch's training batches, from batch `skip_batches` on.

    rows: only these rows of every batch (this process's, with several
    processes): the other examples are read but never decoded.
    """
    tf = _tf()
    steps = self.steps_per_epoch(batch_size)
    if not 0 <= skip_batches <= steps:
      raise ValueError(f"skip_batches={skip_batches} must be in 0..{steps}")
    epoch_seed = _epoch_seed(seed, epoch)
    ds = self._read(self.train_split, shuffle_seed=epoch_seed)
    ds = ds.shuffle(self.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.take(steps * batch_size).enumerate().skip(skip_batches * batch_size)
    ds, per_batch = _rows_only(ds, batch_size, rows)
    ds = ds.map(functools.partial(self._train_example, seed=seed, epoch=epoch),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_batch, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

  def train_batches(self, batch_size: int, seed: int, start_step: int = 0,
                    rows: slice | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless training batches `(images, labels)` from step `start_step` on.

    Step `s` is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`,
    and each epoch's order is fixed by `(seed, epoch)`: resuming at step `k`
    yields what a fresh iterator yields as its k-th batch. rows: only these
    rows of each batch (``train_epoch``).
    """
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0")
    steps = self.steps_per_epoch(batch_size)
    first_epoch, skip = divmod(start_step, steps)
    for epoch in itertools.count(first_epoch):
      ds = self.train_epoch(batch_size, seed, epoch, skip if epoch == first_epoch else 0, rows)
      yield from ds.as_numpy_iterator()

  def test_batches(self, batch_size: int, rows: slice | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """All test examples in order as `(images, labels, valid)` batches of `batch_size`.

    The last batch is padded to full size (zero images, label 0) so that every
    batch has one shape; `valid` (bool `(batch,)`) marks the real examples.
    rows: only these rows of every batch, decoding only their examples.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    tf = _tf()
    ds = self._read(self.test_split).map(lambda jpeg, label: (jpeg, label, True))
    padding = (-self.num_test) % batch_size
    if padding:  # Blank records, "decoded" as zero images.
      blank = (tf.constant(b""), tf.constant(0, tf.int64), False)
      ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    ds, per_batch = _rows_only(ds.enumerate(), batch_size, rows)
    zeros = tf.zeros([self.image_size, self.image_size, 3], tf.float32)
    ds = ds.map(lambda _, example: tf.cond(
        example[2], lambda: (*self._test_example(example[0], example[1]), True),
        lambda: (zeros, tf.constant(0, tf.int32), False)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()
