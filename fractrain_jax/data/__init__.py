"""Input pipeline: CIFAR-sized data held as arrays, ImageNet streamed by tf.data.

Two shapes of data, chosen by the dataset name (see :func:`is_streamed`):
``text:PATH`` (a word-level corpus for the Transformer LM) is read into
token windows (:func:`load_text`) that stay on the device like CIFAR;
``cifar10``, ``cifar100`` and ``folder:PATH`` are loaded into memory
(:func:`load_arrays`) and batched and augmented on the device inside the
jitted step (:func:`batch_indices`, :func:`augment`); ``imagenet2012`` streams
through tf.data (:class:`StreamData`) and reaches the device through
:func:`prefetch_to_device`.

Modules:

* ``common``: dataset names, normalization statistics, TensorFlow and
  tensorflow-datasets imported on first use, the prepared-dataset check.
* ``arrays``: in-memory datasets (:class:`ArrayData`, :func:`load_arrays`,
  subsets).
* ``folder``: an image folder (``folder:PATH``) read into arrays.
* ``text``: a word-level corpus (``text:PATH``) as token windows (:class:`TextData`).
* ``augment``: on-device batch order and augmentation (JAX only).
* ``stream``: the ImageNet tf.data stream (:class:`StreamData`).
* ``prefetch``: :func:`prefetch_to_device`.

Importing this package imports no TensorFlow; the functions that read data
do, on first use. The public names are re-exported here, so ``data.augment``
is the function; the module of that name is ``fractrain_jax.data.augment`` in
``sys.modules`` (``from fractrain_jax.data.augment import ...`` reaches it).
"""

from fractrain_jax.data.arrays import ArrayData, load_arrays, subset_indices
from fractrain_jax.data.augment import (
    augment, batch_indices, crop_flip, normalize, sample_crop_flip)
from fractrain_jax.data.common import (
    ARRAY_DATASETS, CIFAR_MEAN, CIFAR_STD, DATASETS, FOLDER_PREFIX, IMAGENET_MEAN,
    IMAGENET_STD, STREAMED_DATASETS, TEXT_PREFIX, Float3, is_streamed, is_text)
from fractrain_jax.data.prefetch import prefetch_to_device
from fractrain_jax.data.stream import StreamData
from fractrain_jax.data.text import TextData, load_text

__all__ = [
    "ARRAY_DATASETS",
    "ArrayData",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASETS",
    "FOLDER_PREFIX",
    "Float3",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STREAMED_DATASETS",
    "StreamData",
    "TEXT_PREFIX",
    "TextData",
    "augment",
    "batch_indices",
    "crop_flip",
    "is_streamed",
    "is_text",
    "load_arrays",
    "load_text",
    "normalize",
    "prefetch_to_device",
    "sample_crop_flip",
    "subset_indices",
]
