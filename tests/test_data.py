"""Tests of the input pipeline (fractrain_jax/data/).

Datasets come from `tfds.testing.mock_data` or from tiny image folders written
here; nothing is downloaded.
"""

import itertools
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from fractrain_jax import data, errors
from fractrain_jax.data import folder

MEAN = np.asarray(data.CIFAR_MEAN, np.float32)
STD = np.asarray(data.CIFAR_STD, np.float32)


def _np_normalize(images, mean=MEAN, std=STD):
  return (images.astype(np.float32) / 255.0 - mean) / std


def _np_crop_flip(images, offsets, flips, pad):
  """Reference: zero-pad, slice each image at its offset, mirror where flipped."""
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.empty_like(images)
  for i in range(n):
    r, c = offsets[i]
    crop = padded[i, r:r + h, c:c + w]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


def _images(n, h=6, w=5, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------
# Lazy TensorFlow import.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["fractrain_jax.data", "fractrain_jax.data.augment"])
def test_import_does_not_import_tensorflow(module):
  # A fresh interpreter: this one has imported TensorFlow already (tfds above).
  code = f"import sys; import {module}; assert 'tensorflow' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=pathlib.Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------------
# On-device augmentation and batch order.
# ---------------------------------------------------------------------------


def test_normalize_matches_numpy():
  images = _images(3)
  got = jax.jit(data.normalize, static_argnums=(1, 2))(
      jnp.asarray(images), data.CIFAR_MEAN, data.CIFAR_STD)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_normalize(images), rtol=1e-6, atol=1e-6)


def test_crop_flip_matches_numpy_for_given_offsets():
  images = _images(4)
  offsets = np.array([[0, 0], [4, 8], [8, 3], [2, 5]], np.int32)
  flips = np.array([False, True, False, True])
  got = data.crop_flip(jnp.asarray(images), jnp.asarray(offsets), jnp.asarray(flips), pad=4)
  np.testing.assert_array_equal(got, _np_crop_flip(images, offsets, flips, 4))
  # Offset (pad, pad) unflipped is the image itself.
  np.testing.assert_array_equal(
      data.crop_flip(jnp.asarray(images), jnp.full((4, 2), 4, jnp.int32),
                     jnp.zeros(4, bool), pad=4), images)


def test_augment_is_sampled_crop_flip_then_normalize():
  images = _images(64, h=8, w=8)
  key = jax.random.key(3)
  aug = jax.jit(data.augment, static_argnums=(2, 3), static_argnames="pad")
  got = aug(key, jnp.asarray(images), data.CIFAR_MEAN, data.CIFAR_STD, pad=4)
  offsets, flips = map(np.asarray, data.sample_crop_flip(key, 64, pad=4))
  assert offsets.min() >= 0 and offsets.max() <= 8
  # 64 samples: every offset row and both flip states occur.
  assert len(np.unique(offsets[:, 0])) > 4 and 0 < flips.sum() < 64
  chex.assert_shape(got, images.shape)
  assert got.dtype == jnp.float32
  want = _np_normalize(_np_crop_flip(images, offsets, flips, 4))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Padding is black in pixel space: it normalizes to -mean/std.
  i = int(np.argmax((offsets[:, 0] == 0)))
  np.testing.assert_allclose(got[i, :4], np.broadcast_to(-MEAN / STD, (4, 8, 3)), rtol=1e-6)
  # Another key, other crops.
  assert not np.allclose(aug(jax.random.key(4), jnp.asarray(images),
                             data.CIFAR_MEAN, data.CIFAR_STD, pad=4), got)


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit,
                                       jax.sharding.AxisType.Auto])
def test_augment_of_a_batch_sharded_over_devices_matches_unsharded(axis_type):
  images = jnp.asarray(_images(8, h=8, w=8))
  mesh = jax.make_mesh((2,), ("data",), axis_types=(axis_type,))
  sharded = jax.device_put(images, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  aug = jax.jit(lambda k, x: data.augment(k, x, data.CIFAR_MEAN, data.CIFAR_STD))
  key = jax.random.key(11)
  np.testing.assert_array_equal(aug(key, sharded), aug(key, images))


def test_augment_refuses_non_uint8():
  with pytest.raises(ValueError, match="uint8"):
    data.augment(jax.random.key(0), jnp.zeros((2, 4, 4, 3)), data.CIFAR_MEAN, data.CIFAR_STD)


def test_batch_indices_visit_each_example_once_per_epoch():
  key = jax.random.key(7)
  n, b = 10, 3  # 3 steps per epoch, one example dropped each epoch.
  epochs = []
  for epoch in range(2):
    steps = [np.asarray(data.batch_indices(key, 3 * epoch + s, n, b)) for s in range(3)]
    order = np.concatenate(steps)
    assert order.dtype == np.int32
    assert len(set(order.tolist())) == 9 and order.min() >= 0 and order.max() < n
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    np.testing.assert_array_equal(order, perm[:9])
    epochs.append(order)
  assert not np.array_equal(epochs[0], epochs[1])
  # Same (key, step), same batch; traced step under jit gives the same.
  jitted = jax.jit(data.batch_indices, static_argnums=(2, 3))
  for step in (0, 4, 5, 100):
    np.testing.assert_array_equal(jitted(key, jnp.int32(step), n, b),
                                  data.batch_indices(key, step, n, b))


def test_an_epoch_order_given_once_picks_the_batches_of_the_step_itself():
  key, n, b = jax.random.key(3), 10, 3
  for step in range(7):  # Across two epoch boundaries.
    order = data.epoch_order(key, step // 3, n)
    np.testing.assert_array_equal(data.batch_indices(key, step, n, b, order=order),
                                  data.batch_indices(key, step, n, b))
  with pytest.raises(ValueError, match=r"order has shape \(9,\); expected \(10,\)"):
    data.batch_indices(key, 0, n, b, order=jnp.arange(9))


def test_batch_indices_refuses_bad_batch_size():
  with pytest.raises(ValueError, match="batch_size=11"):
    data.batch_indices(jax.random.key(0), 0, 10, 11)


# ---------------------------------------------------------------------------
# Subsets.
# ---------------------------------------------------------------------------


def test_subset_indices_balanced_seeded():
  labels = np.repeat(np.arange(3), [50, 30, 5])
  for size, want in ((10, [4, 3, 3]), (20, [8, 7, 5]), (85, [50, 30, 5])):
    idx = data.subset_indices(labels, size, seed=1)
    assert len(idx) == size and len(np.unique(idx)) == size
    assert np.all(np.diff(idx) > 0)
    counts = np.bincount(labels[idx], minlength=3)
    # Balanced as far as each class's supply allows.
    np.testing.assert_array_equal(np.sort(counts)[::-1], sorted(want, reverse=True))
    np.testing.assert_array_equal(idx, data.subset_indices(labels, size, seed=1))
  assert not np.array_equal(data.subset_indices(labels, 10, seed=1),
                            data.subset_indices(labels, 10, seed=2))
  with pytest.raises(ValueError, match="subset size 86"):
    data.subset_indices(labels, 86, seed=0)


# ---------------------------------------------------------------------------
# Image folders.
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def folder_cache(tmp_path_factory, monkeypatch):
  """Each test's own decode cache (never ~/.cache)."""
  path = tmp_path_factory.mktemp("folder_cache")
  monkeypatch.setenv(folder.CACHE_ENV, str(path))
  return path


def _write_folder(root, layout, fmt="png"):
  """layout: {split: {class: uint8 images (n, h, w, 3)}}; returns {class: images} per split."""
  for split, classes in layout.items():
    for name, images in classes.items():
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(root, split, name, f"{i}.{fmt}"))
  return root


def _two_class_layout(h=6, w=5):
  return {
      "train": {"dog": _images(3, h, w, seed=1), "cat": _images(2, h, w, seed=2)},
      "test": {"dog": _images(2, h, w, seed=3), "cat": _images(2, h, w, seed=4)},
  }


def _label_of(image, classes_images):
  """The class (sorted index) whose source images hold `image` exactly."""
  hits = [k for k, (_, imgs) in enumerate(sorted(classes_images.items()))
          if any(np.array_equal(image, src) for src in imgs)]
  assert len(hits) == 1
  return hits[0]


def _files_in_order(root, split):
  """The split's image files in (class, file name) order: the order load_arrays keeps."""
  split_dir = pathlib.Path(root) / split
  return [str(f) for c in sorted(p.name for p in split_dir.iterdir() if p.is_dir())
          for f in sorted((split_dir / c).iterdir(), key=lambda f: f.name)
          if f.suffix.lower() in (".png", ".jpg", ".jpeg")]


def _tfds_image_folder(root):
  """{split: {file: (label, image)}} as tfds.ImageFolder reads the folder (TensorFlow)."""
  builder = tfds.ImageFolder(str(root), shape=(None, None, 3))
  return {split: {ex["image/filename"].decode(): (int(ex["label"]), ex["image"])
                  for ex in tfds.as_numpy(builder.as_dataset(split=split))}
          for split in ("train", "test")}


def test_folder_png_loads_exact_pixels_and_sorted_labels(tmp_path):
  layout = _two_class_layout()
  root = _write_folder(str(tmp_path), layout)
  ds = data.load_arrays(f"folder:{root}")
  assert ds.num_classes == 2 and (ds.mean, ds.std) == (data.CIFAR_MEAN, data.CIFAR_STD)
  for split, n in (("train", 5), ("test", 4)):
    images = getattr(ds, f"{split}_images")
    labels = getattr(ds, f"{split}_labels")
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    chex.assert_shape(images, (n, 6, 5, 3))
    # "cat" < "dog": cat is 0, dog is 1; (class, file name) order.
    np.testing.assert_array_equal(labels, np.sort(labels))
    want = np.concatenate([layout[split]["cat"], layout[split]["dog"]])
    np.testing.assert_array_equal(images, want)
    for image, label in zip(images, labels):
      assert label == _label_of(image, layout[split])


def _mixed_mode_png_folder(root):
  """PNGs in RGB, grey, RGBA and palette modes (all must come out RGB)."""
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for c, name in enumerate(("b_plane", "a_car", "c_ship")):
      folder_ = pathlib.Path(root) / split / name
      folder_.mkdir(parents=True)
      for i, mode in enumerate(("RGB", "L", "RGBA", "P")):
        rgb = Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8))
        image = rgb.convert(mode) if mode != "P" else rgb.quantize(16)
        image.save(folder_ / f"{10 - i}_{mode}.png")  # File names out of mode order.
      if c == 0:  # Not images: ignored, as by tfds.ImageFolder.
        (folder_ / "notes.txt").write_text("x")
  return root


def _paired_with_tfds(ds, root, want, split, count):
  """(file, our image, tfds's image) of a split, in our order; the labels must agree."""
  images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
  files = _files_in_order(root, split)
  assert len(files) == len(want[split]) == len(images) == count
  pairs = []
  for file, image, label in zip(files, images, labels):
    want_label, want_image = want[split][file]
    assert label == want_label, file
    pairs.append((file, image, want_image))
  return pairs


def test_folder_png_matches_tfds_image_folder(tmp_path):
  root = _mixed_mode_png_folder(tmp_path / "png")
  ds = data.load_arrays(f"folder:{root}")
  want = _tfds_image_folder(root)
  for split in ("train", "test"):
    images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
    for file, image, want_image in _paired_with_tfds(ds, root, want, split, 12):
      np.testing.assert_array_equal(image, want_image, err_msg=file)
    # The same as sorted sets of (label, image bytes).
    assert (sorted((int(l), x.tobytes()) for l, x in zip(labels, images))
            == sorted((l, x.tobytes()) for l, x in want[split].values()))


def test_folder_jpeg_matches_tensorflow_accurate_dct(tmp_path):
  rng = np.random.default_rng(1)
  smooth = np.linspace(0, 250, 16, dtype=np.uint8)[None, :, None]
  root = tmp_path / "jpeg"
  for split in ("train", "test"):
    for c, ext in enumerate((".jpg", ".JPEG", ".jpeg")):
      folder_ = root / split / f"class{c}"
      folder_.mkdir(parents=True)
      for i in range(3):
        image = np.clip(smooth + rng.integers(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder_ / f"{i}{ext}", quality=85)
  ds = data.load_arrays(f"folder:{root}")
  want = _tfds_image_folder(root)
  tf = data.common._tf()  # pylint: disable=protected-access
  for split in ("train", "test"):
    for file, image, want_image in _paired_with_tfds(ds, root, want, split, 9):
      # tfds.ImageFolder decodes with TF's default fast DCT, Pillow with the
      # accurate one: a few levels apart, and exactly TF's accurate decode.
      assert np.abs(image.astype(int) - want_image).max() <= 8, file
      accurate = tf.image.decode_jpeg(tf.io.read_file(file), channels=3,
                                      dct_method="INTEGER_ACCURATE").numpy()
      np.testing.assert_array_equal(image, accurate, err_msg=file)


def test_folder_real_cifar10_jpegs_match_tfds_image_folder(real_cifar10_folder):
  ds = data.load_arrays(f"folder:{real_cifar10_folder}")
  want = _tfds_image_folder(real_cifar10_folder)
  assert ds.num_classes == 10 and ds.num_train == 500 and ds.num_test == 100
  worst = 0
  for _, image, want_image in _paired_with_tfds(ds, real_cifar10_folder, want, "test", 100):
    worst = max(worst, np.abs(image.astype(int) - want_image).max())
  assert worst <= 5  # Measured over all 60,000 CIFAR-10 JPEGs: at most 5, mean 1.0.


def test_folder_jpeg_loads(tmp_path):
  smooth = np.broadcast_to(np.linspace(0, 250, 16, dtype=np.uint8)[None, :, None],
                           (16, 16, 3)).copy()
  layout = {s: {"a": smooth[None], "b": (255 - smooth)[None]} for s in ("train", "test")}
  root = _write_folder(str(tmp_path), layout, fmt="jpg")
  ds = data.load_arrays(f"folder:{root}")
  chex.assert_shape(ds.train_images, (2, 16, 16, 3))
  for image, label in zip(ds.train_images, ds.train_labels):
    src = smooth if label == 0 else 255 - smooth
    assert np.abs(image.astype(int) - src).mean() < 8


def test_folder_subsets_fixed_per_seed(tmp_path):
  root = _write_folder(str(tmp_path), _two_class_layout())
  a = data.load_arrays(f"folder:{root}", train_subset=4, test_subset=2, seed=5)
  b = data.load_arrays(f"folder:{root}", train_subset=4, test_subset=2, seed=5)
  assert a.num_train == 4 and a.num_test == 2
  np.testing.assert_array_equal(np.bincount(a.train_labels), [2, 2])
  np.testing.assert_array_equal(np.bincount(a.test_labels), [1, 1])
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  with pytest.raises(ValueError, match="train_subset=6 exceeds the 5"):
    data.load_arrays(f"folder:{root}", train_subset=6)
  with pytest.raises(ValueError, match="test_subset=-1"):
    data.load_arrays(f"folder:{root}", test_subset=-1)


def test_folder_errors(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=missing) as err:
    data.load_arrays(f"folder:{missing}")
  assert isinstance(err.value, errors.DataError)  # main.py prints it as one line.

  only_train = _write_folder(str(tmp_path / "only_train"),
                             {"train": _two_class_layout()["train"]})
  with pytest.raises(FileNotFoundError, match=os.path.join(only_train, "test")):
    data.load_arrays(f"folder:{only_train}")

  no_classes = tmp_path / "no_classes"
  (no_classes / "train").mkdir(parents=True)
  (no_classes / "test").mkdir()
  with pytest.raises(ValueError, match=f"{no_classes / 'train'} has no class subfolders"):
    data.load_arrays(f"folder:{no_classes}")

  one_class = _write_folder(str(tmp_path / "one_class"),
                            {s: {"cat": c["cat"]} for s, c in _two_class_layout().items()})
  with pytest.raises(ValueError, match=f"{os.path.join(one_class, 'train')} has one class "
                     r"subfolder \(cat\); a classification dataset needs at least 2"):
    data.load_arrays(f"folder:{one_class}")

  layout = _two_class_layout()
  layout["test"]["bird"] = _images(1)
  mismatch = _write_folder(str(tmp_path / "mismatch"), layout)
  with pytest.raises(ValueError, match=r"only in test: \['bird'\]"):
    data.load_arrays(f"folder:{mismatch}")

  empty = _write_folder(str(tmp_path / "empty"), _two_class_layout())
  for split in ("train", "test"):
    os.makedirs(os.path.join(empty, split, "emu"))
  (pathlib.Path(empty) / "train" / "emu" / "readme.txt").write_text("no images here")
  with pytest.raises(ValueError, match=f"class folder {os.path.join(empty, 'train', 'emu')} "
                     "holds no .png/.jpg/.jpeg images"):
    data.load_arrays(f"folder:{empty}")


def test_folder_refuses_images_of_another_size_naming_the_first(tmp_path):
  # Sorted order: cat/0, cat/1, dog/0, ...; cat/0 sets the size, dog/1 is the first to differ.
  layout = _two_class_layout()
  layout["train"]["dog"] = [_images(1)[0], _images(1, 7, 7)[0], _images(1, 4, 4)[0]]
  sizes = _write_folder(str(tmp_path / "sizes"), layout)
  first = os.path.join(sizes, "train", "cat", "0.png")
  other = os.path.join(sizes, "train", "dog", "1.png")
  with pytest.raises(ValueError, match=f"one size, but {first} is 6x5 and {other} is 7x7"):
    data.load_arrays(f"folder:{sizes}")

  # Test images of another size than the train images: the first test file is named.
  layout = _two_class_layout()
  layout["test"] = {"cat": _images(1, 8, 8), "dog": _images(1, 8, 8)}
  split_sizes = _write_folder(str(tmp_path / "split_sizes"), layout)
  first = os.path.join(split_sizes, "train", "cat", "0.png")
  other = os.path.join(split_sizes, "test", "cat", "0.png")
  with pytest.raises(ValueError, match=f"one size, but {first} is 6x5 and {other} is 8x8"):
    data.load_arrays(f"folder:{split_sizes}")
  # The same when the train split comes from the cache.
  with pytest.raises(ValueError, match=f"{other} is 8x8"):
    data.load_arrays(f"folder:{split_sizes}")


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_folder_refuses_a_corrupt_image_naming_it(tmp_path, content):
  root = _write_folder(str(tmp_path), _two_class_layout())
  bad = pathlib.Path(root) / "train" / "dog" / "1.png"
  if content == "truncated":
    content = bad.read_bytes()[:60]
  bad.write_bytes(content)
  with pytest.raises(ValueError, match=f"cannot read image {bad}.*replace the file"):
    data.load_arrays(f"folder:{root}")


def test_folder_thread_pool_gives_the_same_arrays_and_errors(tmp_path, monkeypatch):
  layout = {s: {c: _images(20, 6, 5, seed=10 * k + i) for i, c in enumerate("abc")}
            for k, s in enumerate(("train", "test"))}
  root = _write_folder(str(tmp_path / "pool"), layout)
  serial = data.load_arrays(f"folder:{root}")
  monkeypatch.setenv(folder.CACHE_ENV, str(tmp_path / "pool_cache"))
  monkeypatch.setattr(folder, "_POOL_MIN_MEAN_BYTES", 0)
  monkeypatch.setattr(folder, "_POOL_MIN_FILES", 0)
  monkeypatch.setattr(folder, "_MAX_WORKERS", 4)
  monkeypatch.setattr(folder.os, "cpu_count", lambda: 4)
  pooled = data.load_arrays(f"folder:{root}")
  np.testing.assert_array_equal(pooled.train_images, serial.train_images)
  np.testing.assert_array_equal(pooled.test_labels, serial.test_labels)
  # Two bad files in different chunks: the first in order is named.
  for bad in ("c/10.png", "b/17.png"):  # Chunks of 16: indices 50 and 37.
    (pathlib.Path(root) / "train" / bad).write_bytes(b"junk")
  with pytest.raises(ValueError, match="cannot read image .*/train/b/17.png"):
    data.load_arrays(f"folder:{root}")


def _cache_files(cache):
  return sorted(p.name for p in pathlib.Path(cache).iterdir())


def test_folder_cache_hit_skips_decoding(tmp_path, monkeypatch, folder_cache):
  root = _write_folder(str(tmp_path / "root"), _two_class_layout())
  first = data.load_arrays(f"folder:{root}")
  names = _cache_files(folder_cache)
  assert len(names) == 2 and names[0].startswith("test-") and names[1].startswith("train-")
  assert all(n.endswith(".npz") for n in names)

  def no_decoding(path):
    raise AssertionError(f"decoded {path} despite the cache")

  monkeypatch.setattr(folder, "_decode", no_decoding)
  second = data.load_arrays(f"folder:{root}", train_subset=4, seed=2)
  np.testing.assert_array_equal(second.test_images, first.test_images)
  np.testing.assert_array_equal(second.test_labels, first.test_labels)
  assert second.num_train == 4 and second.num_classes == 2
  # The same files elsewhere (copied with their times, as tar extracts them) hit too.
  copy = shutil.copytree(root, tmp_path / "copy")
  third = data.load_arrays(f"folder:{copy}")
  np.testing.assert_array_equal(third.train_images, first.train_images)
  assert _cache_files(folder_cache) == names


@pytest.mark.parametrize("change", ["add", "remove", "resize", "touch"])
def test_folder_cache_misses_when_the_folder_changes(tmp_path, folder_cache, change):
  layout = _two_class_layout()
  root = pathlib.Path(_write_folder(str(tmp_path / "root"), layout))
  before = data.load_arrays(f"folder:{root}")
  dog = root / "train" / "dog"
  if change == "add":
    Image.fromarray(_images(1, seed=9)[0]).save(dog / "9.png")
  elif change == "remove":
    (dog / "2.png").unlink()
  elif change == "resize":  # Same pixels, another file size.
    Image.fromarray(layout["train"]["dog"][0]).save(dog / "0.png", compress_level=0)
  else:  # Only a later mtime.
    mtime = (dog / "0.png").stat().st_mtime_ns + 10**9
    os.utime(dog / "0.png", ns=(mtime, mtime))
  after = data.load_arrays(f"folder:{root}")
  assert after.num_train == {"add": 6, "remove": 4}.get(change, 5)
  if change in ("resize", "touch"):
    np.testing.assert_array_equal(after.train_images, before.train_images)
  # A new train entry; the test split is unchanged and hits.
  names = _cache_files(folder_cache)
  assert len(names) == 3 and sum(n.startswith("train-") for n in names) == 2


def test_folder_cache_unwritable_only_warns(tmp_path, monkeypatch, caplog):
  root = _write_folder(str(tmp_path / "root"), _two_class_layout())
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv(folder.CACHE_ENV, str(blocker / "cache"))  # Under a file: mkdir fails.
  with caplog.at_level(logging.WARNING, logger="fractrain_jax.data.folder"):
    ds = data.load_arrays(f"folder:{root}")
  assert ds.num_train == 5
  assert "could not write the folder cache" in caplog.text and folder.CACHE_ENV in caplog.text
  assert not list(tmp_path.glob("**/*.tmp"))


def test_folder_cache_corrupt_entry_is_decoded_again(tmp_path, folder_cache, caplog):
  root = _write_folder(str(tmp_path / "root"), _two_class_layout())
  first = data.load_arrays(f"folder:{root}")
  for entry in pathlib.Path(folder_cache).iterdir():
    entry.write_bytes(b"garbage")
  with caplog.at_level(logging.WARNING, logger="fractrain_jax.data.folder"):
    again = data.load_arrays(f"folder:{root}")
  assert "ignoring unreadable folder cache" in caplog.text
  np.testing.assert_array_equal(again.train_images, first.train_images)
  # Rewritten: a third load reads it.
  assert all(p.stat().st_size > 100 for p in pathlib.Path(folder_cache).iterdir())


def test_folder_cache_dir_default_and_env(monkeypatch):
  monkeypatch.delenv(folder.CACHE_ENV)
  assert folder.cache_dir() == pathlib.Path.home() / ".cache" / "fractrain_jax" / "folders"
  monkeypatch.setenv(folder.CACHE_ENV, "~/elsewhere")
  assert folder.cache_dir() == pathlib.Path.home() / "elsewhere"


def test_folder_reads_real_files_under_mock_data(tmp_path):
  layout = _two_class_layout()
  root = _write_folder(str(tmp_path), layout)
  with tfds.testing.mock_data(num_examples=3):
    ds = data.load_arrays(f"folder:{root}")
  assert ds.num_train == 5
  for image, label in zip(ds.train_images, ds.train_labels):
    assert label == _label_of(image, layout["train"])


# ---------------------------------------------------------------------------
# tfds datasets: names, mock data, not-prepared refusal.
# ---------------------------------------------------------------------------


def test_unknown_dataset_lists_accepted_names():
  with pytest.raises(ValueError, match="mnist.*cifar10.*cifar100.*imagenet2012.*folder:PATH"):
    data.load_arrays("mnist")
  with pytest.raises(ValueError, match="folder:"):
    data.is_streamed("folder:")
  assert data.is_streamed("imagenet2012") and not data.is_streamed("cifar10")
  assert not data.is_streamed("folder:/x")
  with pytest.raises(ValueError, match="StreamData"):
    data.load_arrays("imagenet2012")
  with pytest.raises(ValueError, match="load_arrays"):
    data.StreamData("cifar100")


@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_mock_cifar_loads_into_arrays(tmp_path, name, num_classes):
  # An empty data_dir: the mock must not be refused as "not prepared".
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load_arrays(name, data_dir=str(tmp_path), train_subset=4)
  assert ds.num_classes == num_classes
  chex.assert_shape([ds.train_images, ds.test_images], [(4, 32, 32, 3), (6, 32, 32, 3)])
  assert ds.train_images.dtype == np.uint8 and ds.test_labels.dtype == np.int32
  assert 0 <= ds.test_labels.min() and ds.test_labels.max() < num_classes


def test_not_prepared_fails_fast_and_names_data_dir(tmp_path):
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as err:
    data.load_arrays("cifar10", data_dir=str(tmp_path))
  assert time.monotonic() - start < 30
  message = str(err.value)
  for part in ("'cifar10'", str(tmp_path), "--config.data.data_dir=",
               "--config.data.download=True", "--config.data.dataset=folder:PATH"):
    assert part in message
  with pytest.raises(FileNotFoundError, match="imagenet2012"):
    data.StreamData("imagenet2012", data_dir=str(tmp_path))


def test_imagenet_names_its_manual_files_even_with_download_on(tmp_path):
  t0 = time.monotonic()
  with pytest.raises(FileNotFoundError) as err:
    data.StreamData("imagenet2012", data_dir=str(tmp_path), download=True)
  assert time.monotonic() - t0 < 30
  message = str(err.value)
  assert "\n" not in message and "TFDS cannot download it" in message
  for part in ("ILSVRC2012_img_train.tar", str(tmp_path / "downloads" / "manual"),
               "--config.data.data_dir=", "--config.data.dataset=folder:PATH"):
    assert part in message, part


def test_download_hosts_are_probed_quickly():
  from fractrain_jax.data import tfds_prepare  # pylint: disable=import-outside-toplevel

  assert tfds_prepare.download_urls(tfds.builder("cifar10")) == [
      "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
  with socket.socket() as server:  # Loopback only: one host that answers, one that does not.
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert tfds_prepare.unreachable([f"http://127.0.0.1:{port}/a.tar"], timeout=5) is None
  t0 = time.monotonic()
  why = tfds_prepare.unreachable([f"https://127.0.0.1:{port}/a.tar"], timeout=5)
  assert why == f"127.0.0.1:{port}: Connection refused" and time.monotonic() - t0 < 5


def test_tensorflow_starts_without_a_line():
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
  code = ("from fractrain_jax.run import platform; platform.configure(); import jax; "
          "from fractrain_jax.data.common import _tfds; _tfds()")
  done = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parents[1],
                        env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]


# ---------------------------------------------------------------------------
# ImageNet stream and device prefetch.
# ---------------------------------------------------------------------------


def test_imagenet_stream_on_mock_data_is_resumable(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    stream = data.StreamData("imagenet2012", data_dir=str(tmp_path), image_size=16,
                             shuffle_buffer=8)
    assert (stream.num_classes, stream.num_train, stream.num_test) == (1000, 12, 12)
    assert stream.steps_per_epoch(4) == 3
    fresh = stream.train_batches(4, seed=0)
    batches = [next(fresh) for _ in range(6)]  # two epochs
    for images, labels in batches:
      chex.assert_shape(images, (4, 16, 16, 3))
      assert images.dtype == np.float32 and labels.dtype == np.int32
      lo = (0 - np.asarray(data.IMAGENET_MEAN)) / np.asarray(data.IMAGENET_STD)
      hi = (1 - np.asarray(data.IMAGENET_MEAN)) / np.asarray(data.IMAGENET_STD)
      assert np.all(images >= lo - 1e-4) and np.all(images <= hi + 1e-4)
    tests = list(stream.test_batches(5))
    # Each epoch visits every example once (mock train and test splits are the same).
    all_labels = np.sort(np.concatenate([t[1][t[2]] for t in tests]))
    for epoch in range(2):
      np.testing.assert_array_equal(
          np.sort(np.concatenate([b[1] for b in batches[3 * epoch:3 * epoch + 3]])), all_labels)
    assert not np.array_equal(batches[0][1], batches[3][1])
    for step in (2, 4):
      images, labels = next(stream.train_batches(4, seed=0, start_step=step))
      np.testing.assert_array_equal(labels, batches[step][1])
      np.testing.assert_array_equal(images, batches[step][0])
    other = next(stream.train_batches(4, seed=1))
    assert not np.array_equal(other[0], batches[0][0])

  assert len(tests) == 3
  for images, labels, valid in tests:
    chex.assert_shape([images, labels, valid], [(5, 16, 16, 3), (5,), (5,)])
  np.testing.assert_array_equal(tests[-1][2], [True, True, False, False, False])


@pytest.mark.parametrize("parts", [2, 3])
def test_imagenet_stream_rows_of_each_process_stack_to_the_whole_batch(tmp_path, parts):
  # Several processes: each decodes only its rows; stacked they are the one-process batch,
  # augmentation included, from any step, and the padded test batches too.
  with tfds.testing.mock_data(num_examples=12):
    stream = data.StreamData("imagenet2012", data_dir=str(tmp_path), image_size=16,
                             shuffle_buffer=8)
    size = 6
    rows = [slice(i * size // parts, (i + 1) * size // parts) for i in range(parts)]
    for start in (0, 3):
      whole = stream.train_batches(size, seed=0, start_step=start)
      shares = [stream.train_batches(size, seed=0, start_step=start, rows=r) for r in rows]
      for _ in range(3):
        want = next(whole)
        got = [next(share) for share in shares]
        for field in range(2):
          np.testing.assert_array_equal(np.concatenate([g[field] for g in got]), want[field])
    want = list(stream.test_batches(5))
    rows = [slice(i * 5 // parts, (i + 1) * 5 // parts) for i in range(parts)]
    got = [list(stream.test_batches(5, rows=r)) for r in rows]
  assert [len(g) for g in got] == [len(want)] * parts
  for b, batch in enumerate(want):
    for field in range(3):
      np.testing.assert_array_equal(np.concatenate([g[b][field] for g in got]), batch[field])


def test_prefetch_to_device_places_batches_and_forwards_errors():
  mesh = jax.make_mesh((2,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  host = [(np.full((4, 3), i, np.float32), np.arange(4, dtype=np.int32) + i) for i in range(5)]
  got = list(data.prefetch_to_device(iter(host), sharding))
  assert len(got) == 5
  for (x, y), (dx, dy) in zip(host, got):
    assert dx.sharding == sharding and dy.sharding == sharding
    np.testing.assert_array_equal(dx, x)
    np.testing.assert_array_equal(dy, y)

  def failing():
    yield host[0]
    raise OSError("disk gone")

  it = data.prefetch_to_device(failing(), sharding)
  next(it)
  with pytest.raises(OSError, match="disk gone"):
    next(it)


@pytest.mark.parametrize("taken", [0, 1])
def test_closing_the_prefetch_waits_for_its_thread(taken):
  # A thread left inside tf.data at interpreter exit aborts the process: close() must
  # let the batch being read finish and the thread end, also before the first batch.
  reading = threading.Event()

  def slow():
    for i in itertools.count():
      reading.set()
      time.sleep(0.3)
      yield np.full((2,), i, np.float32)

  it = data.prefetch_to_device(slow(), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  for _ in range(taken):
    next(it)
  reading.wait()
  it.close()
  assert not it.thread.is_alive()
  with pytest.raises(StopIteration):
    next(it)


# ---------------------------------------------------------------------------
# The registry of data sources and each one's normalization statistics.
# ---------------------------------------------------------------------------


def _source_config(dataset, **data_keys):
  from configs import default  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.data.dataset = dataset
  config.data.update(data_keys)
  config.train.batch_size = 2
  return config


def test_a_folder_is_normalized_with_its_whole_training_splits_statistics(tmp_path):
  layout = _two_class_layout()
  root = _write_folder(tmp_path / "f", layout)
  # train_subset 2 keeps two images; the statistics are still the whole split's.
  loaded = data.load(_source_config(f"folder:{root}", train_subset=2))
  assert loaded.num_train == 2
  pixels = np.concatenate([imgs for imgs in layout["train"].values()]).astype(np.float64) / 255
  np.testing.assert_allclose(loaded.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(loaded.std, pixels.std(axis=(0, 1, 2)), rtol=1e-12)
  # The paper's recipe on a folder copy of CIFAR-10: SPEC section 6's figures.
  spec = data.load(_source_config(f"folder:{root}", normalization="cifar10"))
  assert (spec.mean, spec.std) == (data.CIFAR_MEAN, data.CIFAR_STD)


def test_tfds_cifar_keeps_the_papers_statistics_unless_asked(tmp_path):
  with tfds.testing.mock_data(num_examples=8):
    own = data.load(_source_config("cifar100", data_dir=str(tmp_path)))
    measured = data.load(_source_config("cifar100", data_dir=str(tmp_path),
                                        normalization="measured"))
  assert (own.mean, own.std) == (data.CIFAR_MEAN, data.CIFAR_STD)
  pixels = measured.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(measured.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-12)


def test_normalization_is_checked_and_part_of_the_run_identity():
  from fractrain_jax.run import checkpoints, config_check  # pylint: disable=import-outside-toplevel

  with pytest.raises(errors.ConfigError, match="imagenet2012 streams"):
    config_check.validate(_source_config("imagenet2012", normalization="measured"))
  with pytest.raises(errors.ConfigError, match="data.normalization='mnist'"):
    config_check.validate(_source_config("cifar10", normalization="mnist"))
  identity = lambda **keys: checkpoints.run_identity(_source_config(**keys))
  # What every run normalized with before the option existed stays out of the identity,
  # so older checkpoints still match; anything else is part of it.
  assert "normalization" not in identity(dataset="cifar10")
  assert "normalization" not in identity(dataset="folder:/x", normalization="cifar10")
  assert identity(dataset="folder:/x")["normalization"] == "measured"
  assert identity(dataset="cifar10", normalization="imagenet")["normalization"] == "imagenet"
