"""The kinds of data source this package registers, one object each, with their loaders.

- ``tfds``: ``cifar10``, ``cifar100`` (tensorflow-datasets, held in memory;
  SPEC section 6's CIFAR-10 statistics, which the paper and the authors'
  code apply to CIFAR-100 too);
- ``tfds-stream``: ``imagenet2012`` (a tf.data stream; the ImageNet statistics);
- ``folder``: ``folder:PATH`` (an image folder read with Pillow, held in
  memory; no published statistics, so they are measured on its training split);
- ``text``: ``text:PATH`` (a word-level corpus, the LM's token windows).

The registry and the base classes are ``sources.py``'s; this module sits above
both it and the loaders (``arrays``, ``stream``, ``text``), which ask the
registry whether a name is streamed.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from fractrain_jax.data.arrays import load_arrays
from fractrain_jax.data.common import FOLDER_PREFIX, TEXT_PREFIX
from fractrain_jax.data.sources import (MEASURED, PUBLISHED, Named, Prefixed, Source, check_batch,
                                        normalization, register)
from fractrain_jax.data.stream import StreamData
from fractrain_jax.data.text import load_text


def _arrays(source: Source, config: ml_collections.ConfigDict):
  d = config.data
  stats = normalization(source, config)
  arrays = load_arrays(d.dataset, data_dir=d.data_dir, download=d.download,
                       train_subset=d.train_subset, test_subset=d.test_subset, seed=config.seed,
                       measure_stats=stats == MEASURED)
  check_batch(config, arrays.num_train, "training images")
  if stats == MEASURED:
    return arrays
  mean, std = PUBLISHED[stats]
  return dataclasses.replace(arrays, mean=mean, std=std)


class TFDSArrays(Named):
  """CIFAR-10 and CIFAR-100 from tensorflow-datasets, held in memory."""
  kind = "tfds"
  names = ("cifar10", "cifar100")
  statistics = "cifar10"

  def load(self, config):
    return _arrays(self, config)


class TFDSStream(Named):
  """ImageNet from tensorflow-datasets, streamed through tf.data."""
  kind = "tfds-stream"
  names = ("imagenet2012",)
  streamed = True
  statistics = "imagenet"

  def load(self, config):
    d = config.data
    mean, std = PUBLISHED[normalization(self, config)]
    return StreamData(d.dataset, data_dir=d.data_dir, download=d.download,
                      image_size=d.image_size, mean=mean, std=std)


class Folder(Prefixed):
  """An image folder (``PATH/train/<class>/*``, ``PATH/test/<class>/*``), held in memory."""
  kind = "folder"
  prefix = FOLDER_PREFIX
  layout = "PATH/train/<class>/ and PATH/test/<class>/"

  def load(self, config):
    return _arrays(self, config)


class Text(Prefixed):
  """A word-level corpus in the WikiText layout: the LM's token windows, held on the device."""
  kind = "text"
  prefix = TEXT_PREFIX
  layout = "PATH/wiki.{train,valid,test}.tokens or PATH/{train,valid,test}.txt"
  task = "lm"

  def load(self, config):
    d = config.data
    text = load_text(d.dataset, context=config.model.lm.context, train_split=d.text_train,
                     test_split=d.text_test, train_subset=d.train_subset,
                     test_subset=d.test_subset)
    check_batch(config, text.num_train, f"training windows of {text.context} tokens")
    return text

for _source in (TFDSArrays(), TFDSStream(), Folder(), Text()):
  register(_source)
