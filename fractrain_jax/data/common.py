"""What the data modules share: name prefixes, statistics, TensorFlow on demand.

* The ``folder:`` and ``text:`` prefixes (``sources.py`` owns the names).
* The published per-channel normalization statistics (SPEC section 6).
* TensorFlow and tensorflow-datasets, imported on first use by the functions
  that read TFDS datasets and the ImageNet stream (:func:`_tf`, :func:`_tfds`),
  never at import time, and kept off the GPUs so that TensorFlow never takes
  accelerator memory from JAX. Image folders (``folder:PATH``) need neither.
  ``tfds_prepare.py`` gives a TFDS dataset's builder, its data prepared.
"""

from __future__ import annotations

import functools
import logging
from typing import Any


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
