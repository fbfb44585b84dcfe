"""An image folder (``folder:PATH``) read into uint8 / int32 arrays.

The layout is ``PATH/train/<class>/`` and ``PATH/test/<class>/`` holding
.png/.jpg/.jpeg files of one size; labels number the classes in sorted order.
The files are read by tfds' ``ImageFolder``, after a check of the layout that
names what is wrong. :func:`fractrain_jax.data.arrays.load_arrays` is the
entry point.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np

from fractrain_jax.data.common import FOLDER_PREFIX, _tf, _tfds


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
