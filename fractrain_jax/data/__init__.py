"""Input pipeline: a registry of data sources, arrays held on the device, streams.

``sources`` is where a dataset name is understood: one kind of source per
form of name (``cifar10``/``cifar100`` and ``imagenet2012`` from
tensorflow-datasets, ``folder:PATH``, ``text:PATH``), each owning its name
check, its loader and its normalization statistics (:func:`load`,
:func:`find_source`). CIFAR-sized data and the LM's token windows are held
on the device and batched (and augmented) inside the jitted step
(:func:`batch_indices`, :func:`augment`); ``imagenet2012`` streams through
tf.data (:class:`StreamData`) and reaches the device through
:func:`prefetch_to_device`.

Modules:

* ``sources``: the registry of source kinds (:func:`register_source`).
* ``kinds``: the four kinds registered here, above the loaders they call.
* ``common``: name prefixes, published normalization statistics, TensorFlow
  and tensorflow-datasets imported on first use.
* ``tfds_prepare``: a TFDS dataset's builder, its data prepared (downloaded
  where TFDS can, after a quick check that its hosts answer).
* ``arrays``: in-memory datasets (:class:`ArrayData`, :func:`load_arrays`,
  subsets).
* ``folder``: an image folder (``folder:PATH``) read into arrays.
* ``text``: a word-level corpus (``text:PATH``) as token windows (:class:`TextData`).
* ``augment``: on-device batch order and augmentation (JAX only).
* ``stream``: the ImageNet tf.data stream (:class:`StreamData`).
* ``prefetch``: :func:`prefetch_to_device`.

Importing this package imports no TensorFlow; the functions that read data
do, on first use. What it may import of the rest of the package: ``errors``
and ``processes`` (how a batch splits over processes), nothing else
(``tests/test_layout.py`` checks it); the loaders ask ``sources`` whether a
name is streamed, and only ``kinds`` imports the loaders. The public names are re-exported here, so ``data.augment``
is the function; the module of that name is ``fractrain_jax.data.augment`` in
``sys.modules`` (``from fractrain_jax.data.augment import ...`` reaches it).
"""

from fractrain_jax.data.arrays import ArrayData, load_arrays, subset_indices
from fractrain_jax.data.augment import (
    augment, batch_indices, crop_flip, epoch_order, normalize, sample_crop_flip,
    steps_per_epoch)
from fractrain_jax.data.common import (
    CIFAR_MEAN, CIFAR_STD, FOLDER_PREFIX, IMAGENET_MEAN, IMAGENET_STD, TEXT_PREFIX, Float3)
from fractrain_jax.data import kinds as _kinds  # Registers the built-in kinds.
from fractrain_jax.data.prefetch import prefetch_to_device
from fractrain_jax.data.sources import (
    Source, accepted, find as find_source, is_streamed, is_text, load,
    register as register_source, unregister as unregister_source)
from fractrain_jax.data.stream import StreamData
from fractrain_jax.data.text import TextData, load_text

__all__ = [
    "ArrayData",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "FOLDER_PREFIX",
    "Float3",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Source",
    "StreamData",
    "TEXT_PREFIX",
    "TextData",
    "accepted",
    "augment",
    "batch_indices",
    "epoch_order",
    "steps_per_epoch",
    "crop_flip",
    "find_source",
    "is_streamed",
    "is_text",
    "load",
    "load_arrays",
    "load_text",
    "normalize",
    "prefetch_to_device",
    "register_source",
    "sample_crop_flip",
    "subset_indices",
    "unregister_source",
]
