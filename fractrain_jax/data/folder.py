"""An image folder (``folder:PATH``) read into uint8 / int32 arrays with Pillow.

The layout is ``PATH/train/<class>/`` and ``PATH/test/<class>/`` holding
.png/.jpg/.jpeg files (any case; other files are ignored) of one size. The
classes are the sorted subfolder names of ``train/`` (``test/`` must have the
same ones, and at least two) and a label is its class's index. Images are read in (class, file
name) order and decoded by Pillow to RGB: grey and palette files are expanded,
an alpha channel is dropped. No TensorFlow is imported.
:func:`fractrain_jax.data.arrays.load_arrays` is the entry point.

A missing folder raises :class:`fractrain_jax.errors.DataError` (a
FileNotFoundError); a layout problem, an image that does not decode or one of
another size raises :class:`~fractrain_jax.errors.DataFormatError` (a
ValueError); each names the folder or file and says what to do, and main.py
prints it as one line.

PNG files decode to the same pixels as TensorFlow decodes them. JPEG files
decode with libjpeg's accurate integer DCT, which is TensorFlow's
``decode_jpeg(dct_method="INTEGER_ACCURATE")``; TensorFlow's default fast DCT
(what tfds' ``ImageFolder`` uses) is a few levels away (on the 60,000
CIFAR-10 JPEGs: 1.0 of 255 on average, at most 5; 35% of the values equal).

Decoding is done once per folder: the decoded arrays of a split are kept in
``<cache>/<split>-<sha256>.npz``, the hash taken over the split's sorted
(relative path, size, mtime_ns) list (plus the decoder's version), so that a
file added, removed, resized or touched makes a new entry. ``<cache>`` is
``$FRACTRAIN_CACHE_DIR`` or ``~/.cache/fractrain_jax/folders``; delete it to
free the space (old entries are never removed). Entries are written atomically
(a temporary file renamed into place); a cache that cannot be written only
logs a warning.

Files whose mean size is at least ``_POOL_MIN_MEAN_BYTES`` decode in a thread
pool (Pillow releases the GIL while it decodes). Small files such as CIFAR's
1 KB JPEGs decode faster in one thread: there the per-file Python work, which
holds the GIL, dominates (measured on 2 cores: 50,000 CIFAR-10 JPEGs in 5.0 s
in one thread, 6.4 s in two).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import tempfile
import time

import numpy as np
import PIL
from PIL import Image

from fractrain_jax.data.common import FOLDER_PREFIX
from fractrain_jax.errors import DataError, DataFormatError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_ENV = "FRACTRAIN_CACHE_DIR"
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/fractrain_jax/folders")

# Bump when the decoded arrays of the same files would change.
_CACHE_VERSION = 1
# Thread pool only for files at least this large on average, and this many.
_POOL_MIN_MEAN_BYTES = 16 * 1024
_POOL_MIN_FILES = 64
_MAX_WORKERS = 16

Split = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _File:
  rel: str  # "split/class/name", "/"-separated
  label: int
  size: int
  mtime_ns: int


def cache_dir() -> pathlib.Path:
  """Where decoded splits are cached: ``$FRACTRAIN_CACHE_DIR`` or ``~/.cache/fractrain_jax/folders``."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


# ---------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------


def _list_dirs(path: str) -> list[str]:
  with os.scandir(path) as entries:
    return sorted(e.name for e in entries if e.is_dir())


def _folder_classes(root: str, spec: str) -> list[str]:
  """Checks the folder layout; returns the class names (sorted subfolders)."""
  layout = f"expected {root}/train/<class>/*.png|jpg and {root}/test/<class>/*.png|jpg"
  if not os.path.isdir(root):
    raise DataError(f"dataset {spec!r}: folder {root} does not exist; {layout}")
  classes = {}
  for split in ("train", "test"):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise DataError(
          f"dataset {spec!r}: folder {split_dir} does not exist; {layout}")
    classes[split] = _list_dirs(split_dir)
    if not classes[split]:
      raise DataFormatError(f"dataset {spec!r}: {split_dir} has no class subfolders; {layout}")
  if classes["train"] != classes["test"]:
    only_train = sorted(set(classes["train"]) - set(classes["test"]))
    only_test = sorted(set(classes["test"]) - set(classes["train"]))
    raise DataFormatError(
        f"dataset {spec!r}: train and test must have the same classes; only in "
        f"train: {only_train}, only in test: {only_test}")
  if len(classes["train"]) < 2:  # One class trains to 100% and means nothing.
    raise DataFormatError(
        f"dataset {spec!r}: {os.path.join(root, 'train')} has one class subfolder "
        f"({classes['train'][0]}); a classification dataset needs at least 2, one subfolder "
        "per class in train/ and test/")
  return classes["train"]


def _list_split(root: str, split: str, classes: list[str], spec: str) -> list[_File]:
  """The split's image files in (class, file name) order, with their size and mtime."""
  files = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(root, split, name)
    with os.scandir(class_dir) as entries:
      images = sorted((e for e in entries
                       if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()),
                      key=lambda e: e.name)
    if not images:
      raise DataFormatError(
          f"dataset {spec!r}: class folder {class_dir} holds no .png/.jpg/.jpeg "
          "images; add its images or remove the folder from both train/ and test/")
    for e in images:
      st = e.stat()
      files.append(_File(f"{split}/{name}/{e.name}", label, st.st_size, st.st_mtime_ns))
  return files


# ---------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------


def _path(root: str, f: _File) -> str:
  return os.path.join(root, *f.rel.split("/"))


def _decode(path: str) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def _unreadable(spec: str, path: str, err: BaseException) -> DataFormatError:
  return DataFormatError(
      f"dataset {spec!r}: cannot read image {path} ({type(err).__name__}: {err}); "
      "replace the file with a valid .png/.jpg or delete it")


def _size_error(spec: str, reference: tuple[str, tuple[int, ...]], path: str,
                shape: tuple[int, ...]) -> DataFormatError:
  ref_path, ref_shape = reference
  return DataFormatError(
      f"dataset {spec!r}: images must all have one size, but {ref_path} is "
      f"{ref_shape[0]}x{ref_shape[1]} and {path} is {shape[0]}x{shape[1]}; "
      "resize the images to one size")


def _decode_split(root: str, files: list[_File], spec: str,
                  reference: tuple[str, tuple[int, ...]] | None = None) -> Split:
  """Decodes `files` into (N, H, W, 3) uint8 and their int32 labels.

  `reference` is (file, shape) that every image must match (the first train
  image when decoding the test split); None takes the first of `files`.
  Raises DataFormatError naming the first file (in order) that cannot be decoded or
  whose size differs.
  """
  paths = [_path(root, f) for f in files]
  if reference is None:
    try:
      first = _decode(paths[0])
    except Exception as err:  # pylint: disable=broad-except
      raise _unreadable(spec, paths[0], err) from err
    reference = (paths[0], first.shape)
  out = np.empty((len(files),) + tuple(reference[1]), np.uint8)

  def fill(start: int, stop: int) -> tuple[int, BaseException | None, tuple[int, ...]] | None:
    """Decodes paths[start:stop] into out; the first problem as (index, error, shape)."""
    for i in range(start, stop):
      try:
        image = _decode(paths[i])
      except Exception as err:  # pylint: disable=broad-except  # Pillow raises many kinds.
        return i, err, ()
      if image.shape != out.shape[1:]:
        return i, None, image.shape
      out[i] = image
    return None

  workers = min(os.cpu_count() or 1, _MAX_WORKERS)
  mean_bytes = sum(f.size for f in files) / len(files)
  if workers > 1 and len(files) >= _POOL_MIN_FILES and mean_bytes >= _POOL_MIN_MEAN_BYTES:
    chunk = max(16, -(-len(files) // (8 * workers)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      problems = list(pool.map(lambda s: fill(s, min(s + chunk, len(files))),
                               range(0, len(files), chunk)))
  else:
    problems = [fill(0, len(files))]
  problems = [p for p in problems if p is not None]
  if problems:
    i, err, shape = min(problems, key=lambda p: p[0])
    if err is not None:
      raise _unreadable(spec, paths[i], err) from err
    raise _size_error(spec, reference, paths[i], shape)
  return out, np.asarray([f.label for f in files], np.int32)


# ---------------------------------------------------------------------------
# Decode cache.
# ---------------------------------------------------------------------------


def _cache_path(split: str, classes: list[str], files: list[_File]) -> pathlib.Path:
  listing = {
      "version": _CACHE_VERSION,
      "decoder": f"Pillow {PIL.__version__} RGB uint8",
      "classes": classes,
      "files": [(f.rel, f.size, f.mtime_ns) for f in files],
  }
  digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
  return cache_dir() / f"{split}-{digest}.npz"


def _read_cache(path: pathlib.Path, files: list[_File]) -> Split | None:
  """The cached split at `path`, or None when absent or not what `files` say."""
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as cached:
      images, labels = cached["images"], cached["labels"]
  except Exception as err:  # pylint: disable=broad-except
    log.warning("ignoring unreadable folder cache %s (%s); decoding again", path, err)
    return None
  want = np.asarray([f.label for f in files], np.int32)
  if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3
      or labels.dtype != np.int32 or not np.array_equal(labels, want)):
    log.warning("ignoring folder cache %s, which does not match its folder; decoding again",
                path)
    return None
  return images, labels


def _write_cache(path: pathlib.Path, images: np.ndarray, labels: np.ndarray) -> None:
  """Writes the split to `path` atomically; only warns when that fails."""
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem + ".",
                                     suffix=".tmp", delete=False) as f:
      tmp = f.name
      np.savez(f, images=images, labels=labels)
    os.chmod(tmp, 0o644)  # NamedTemporaryFile makes it 0600.
    os.replace(tmp, path)
    tmp = None
  except OSError as err:
    log.warning("could not write the folder cache %s (%s); the next load decodes the "
                "images again (set %s to a writable folder)", path, err, CACHE_ENV)
  finally:
    if tmp is not None:
      try:
        os.remove(tmp)
      except OSError:
        pass


def _load_split(root: str, split: str, classes: list[str], spec: str,
                reference: tuple[str, tuple[int, ...]] | None = None
                ) -> tuple[Split, str]:
  """The split, from the cache or decoded (then cached), and the path of its first file."""
  files = _list_split(root, split, classes, spec)
  first = _path(root, files[0])
  path = _cache_path(split, classes, files)
  start = time.monotonic()
  cached = _read_cache(path, files)
  if cached is not None:
    log.info("%s/%s: %d images read from the cache %s in %.1f s", root, split,
             len(files), path, time.monotonic() - start)
    if reference is not None and cached[0].shape[1:] != tuple(reference[1]):
      # Every cached image has the shape of the first: that is the first to differ.
      raise _size_error(spec, reference, first, cached[0].shape[1:])
    return cached, first
  images, labels = _decode_split(root, files, spec, reference)
  log.info("%s/%s: %d images decoded in %.1f s", root, split, len(files),
           time.monotonic() - start)
  _write_cache(path, images, labels)
  return (images, labels), first


def _load_folder(spec: str) -> tuple[Split, Split, int]:
  """(train, test, num_classes) of `folder:PATH`, each split (uint8 NHWC, int32 labels)."""
  root = os.path.abspath(os.path.expanduser(spec[len(FOLDER_PREFIX):]))
  classes = _folder_classes(root, spec)
  train, first = _load_split(root, "train", classes, spec)
  # The test images must have the train images' size.
  test, _ = _load_split(root, "test", classes, spec, reference=(first, train[0].shape[1:]))
  return train, test, len(classes)
