"""What the data modules share: name prefixes, statistics, TensorFlow on demand.

* The ``folder:`` and ``text:`` prefixes (``sources.py`` owns the names).
* The published per-channel normalization statistics (SPEC section 6).
* TensorFlow and tensorflow-datasets, imported on first use by the functions
  that read TFDS datasets and the ImageNet stream (:func:`_tf`, :func:`_tfds`),
  never at import time, and kept off the GPUs so that TensorFlow never takes
  accelerator memory from JAX. Image folders (``folder:PATH``) need neither.
* :func:`_prepared_builder`: the tfds builder of a dataset, refused fast (with
  what to do instead) when it is not prepared and download is off.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from fractrain_jax.errors import DataError

# SPEC section 6; the paper uses the CIFAR-10 statistics for every CIFAR-sized set.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FOLDER_PREFIX = "folder:"
TEXT_PREFIX = "text:"  # A word-level corpus (data/text.py): the Transformer LM's data.

Float3 = tuple[float, float, float]


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
  raise DataError(
      f"dataset {name!r} is not prepared in data_dir={where} (looked for "
      f"{builder.data_dir}) and download is off. Either point to where it is "
      "prepared with --config.data.data_dir=..., let tfds download and prepare "
      "it with --config.data.download=True, or train on an image folder with "
      "--config.data.dataset=folder:PATH (PATH/train/<class>/, PATH/test/<class>/).")
