"""The JAX-only stack: image folders, TensorBoard scalars and training without TensorFlow.

The checks run in a fresh interpreter, this file run as a script
(``python tests/test_no_tensorflow.py WORKDIR STAGE...``), so that hiding
TensorFlow there leaks into no other test. With ``--hide-tensorflow`` the
script first makes ``import tensorflow`` and ``import tensorflow_datasets``
fail, as on a machine that has only the JAX stack; without it TensorFlow is
installed but must not get imported. Each stage is one ``stage_<name>``
function listed in ``STAGES``: a new check is one more function there.
"""

import sys

if __name__ == "__main__" and "--hide-tensorflow" in sys.argv:
  # Before anything else is imported: None in sys.modules makes the import fail.
  for _name in ("tensorflow", "tensorflow_datasets"):
    sys.modules[_name] = None

import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
HIDDEN = ("tensorflow", "tensorflow_datasets")


# ---------------------------------------------------------------------------
# Helpers (no TensorFlow).
# ---------------------------------------------------------------------------


def read_events(path):
  """The Event protos of a TFRecord event file, CRCs checked, parsed without TensorFlow."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import (  # pylint: disable=import-outside-toplevel
      masked_crc32c)

  raw = pathlib.Path(path).read_bytes()
  events, pos = [], 0
  while pos < len(raw):
    header = raw[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
    assert header_crc == masked_crc32c(header), f"bad header CRC at byte {pos} of {path}"
    body = raw[pos + 12:pos + 12 + length]
    (body_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
    assert body_crc == masked_crc32c(body), f"bad data CRC at byte {pos} of {path}"
    events.append(event_pb2.Event.FromString(body))
    pos += 16 + length
  return events


def scalars_of(path):
  """{tag: [(step, value), ...]} of an event file's simple-value scalars."""
  out = {}
  for event in read_events(path):
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def write_image_folder(root, classes=("cat", "dog"), per_split=None, size=(8, 8)):
  """A tiny PNG folder; returns {split: (images in load order, labels)}."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  per_split = per_split or {"train": 3, "test": 2}
  rng = np.random.default_rng(0)
  want = {}
  for split, n in per_split.items():
    images, labels = [], []
    for label, name in enumerate(classes):
      folder = pathlib.Path(root) / split / name
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        images.append(image)
        labels.append(label)
    want[split] = (np.stack(images), np.asarray(labels, np.int32))
  return want


def assert_no_tensorflow():
  loaded = sorted(m for m, v in sys.modules.items()
                  if m.split(".")[0] in HIDDEN and v is not None)
  assert not loaded, f"TensorFlow modules were imported: {loaded[:5]}"


# ---------------------------------------------------------------------------
# Stages, run by the script in the fresh interpreter.
# ---------------------------------------------------------------------------


def stage_hidden(tmp, hidden):
  """With --hide-tensorflow, importing TensorFlow really fails."""
  del tmp
  if not hidden:
    return
  for name in HIDDEN:
    try:
      __import__(name)
    except ImportError:
      continue
    raise AssertionError(f"import {name} worked although it was hidden")


def stage_folder(tmp, hidden):
  """folder:PATH loads through Pillow (twice: decoded, then from the cache)."""
  del hidden
  from fractrain_jax import data  # pylint: disable=import-outside-toplevel

  root = tmp / "images"
  want = write_image_folder(root)
  for _ in range(2):
    ds = data.load_arrays(f"folder:{root}", test_subset=2)
    assert ds.num_classes == 2 and ds.num_train == 6 and ds.num_test == 2
    np.testing.assert_array_equal(ds.train_images, want["train"][0])
    np.testing.assert_array_equal(ds.train_labels, want["train"][1])
    assert sorted(ds.test_labels.tolist()) == [0, 1]
  assert len(list((tmp / "cache").glob("*.npz"))) == 2


def stage_tensorboard(tmp, hidden):
  """TensorBoardWriter's event file reads back (also with TensorBoard's own reader)."""
  from fractrain_jax.run.tensorboard_writer import TensorBoardWriter  # pylint: disable=import-outside-toplevel

  with TensorBoardWriter(tmp / "tb") as writer:
    writer.write(1, {"loss": 2.5, "acc": 10})
    writer.write(2, {"loss": 1.25, "acc": np.float32(40.0)})
    # Flushed after each write: readable before close.
    assert scalars_of(writer.path)["loss"] == [(1, 2.5), (2, 1.25)]
  assert scalars_of(writer.path) == {"loss": [(1, 2.5), (2, 1.25)], "acc": [(1, 10.0), (2, 40.0)]}
  if hidden:
    # TensorBoard's reader falls back to its TensorFlow stub; with TensorFlow
    # visible it would import TensorFlow, which the visible run checks is never done.
    from tensorboard.backend.event_processing import (  # pylint: disable=import-outside-toplevel
        event_accumulator)

    acc = event_accumulator.EventAccumulator(str(tmp / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["acc", "loss"]
    assert [(e.step, e.value) for e in acc.Scalars("acc")] == [(1, 10.0), (2, 40.0)]


def stage_train(tmp, hidden):
  """A two-iteration static run on the image folder: metrics.jsonl and TensorBoard."""
  del hidden
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_disable_most_optimizations", True)  # Tiny model: compile time dominates.
  from configs import default  # pylint: disable=import-outside-toplevel
  from fractrain_jax.run import train  # pylint: disable=import-outside-toplevel

  root = tmp / "train_images"
  write_image_folder(root, classes=("a", "b", "c"), per_split={"train": 4, "test": 2})
  config = default.get_config()
  config.method = "static"
  config.model.name = "resnet8"
  config.data.dataset = f"folder:{root}"
  config.train.iters = 2
  config.train.batch_size = 4
  config.train.eval_every = 2
  config.train.eval_batch_size = 4
  config.train.num_devices = 1
  workdir = tmp / "run"
  summary = train.train_and_evaluate(config, workdir)
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2], lines
  assert np.isfinite(lines[0]["train_loss"]) and 0 <= summary["final_test_acc"] <= 100
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1, events
  scalars = scalars_of(events[0])
  assert scalars["train_loss"] == [(2, np.float32(lines[0]["train_loss"]))]
  assert scalars["test_acc"] == [(2, np.float32(lines[0]["test_acc"]))]


# Run in this order; a stage may rely on nothing but its own files under WORKDIR.
STAGES = {
    "hidden": stage_hidden,
    "folder": stage_folder,
    "tensorboard": stage_tensorboard,
    "train": stage_train,
}
# With TensorFlow installed and visible, these must still not import it.
VISIBLE_STAGES = ("folder", "tensorboard")


def main(argv):
  hidden = "--hide-tensorflow" in argv
  workdir, *names = [a for a in argv[1:] if a != "--hide-tensorflow"]
  sys.path.insert(0, str(REPO))
  for name in names:
    STAGES[name](pathlib.Path(workdir), hidden)
    assert_no_tensorflow()
    print(f"ok {name}", flush=True)


# ---------------------------------------------------------------------------
# Tests (pytest): each runs the script above in a fresh interpreter.
# ---------------------------------------------------------------------------


def _run_script(tmp_path, stages, *, hide):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
         "FRACTRAIN_CACHE_DIR": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}
  args = [sys.executable, __file__, str(tmp_path), *stages]
  if hide:
    args.append("--hide-tensorflow")
  result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
  assert result.returncode == 0, (
      f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
  done = [l.split()[1] for l in result.stdout.splitlines() if l.startswith("ok ")]
  assert done == list(stages), result.stdout
  return result


def test_jax_stack_works_with_tensorflow_hidden(tmp_path):
  _run_script(tmp_path, list(STAGES), hide=True)


def test_folder_and_tensorboard_do_not_import_installed_tensorflow(tmp_path):
  _run_script(tmp_path, VISIBLE_STAGES, hide=False)


def test_tensorboard_writer_in_process(tmp_path):
  from fractrain_jax.run.tensorboard_writer import TensorBoardWriter  # pylint: disable=import-outside-toplevel

  writer = TensorBoardWriter(tmp_path / "tb")
  events = read_events(writer.path)
  assert len(events) == 1 and events[0].file_version == "brain.Event:2"
  writer.write(0, {})
  writer.write(5, {"a/b": 1, "c": float("nan")})
  writer.write(7, {"a/b": -3.5})
  got = scalars_of(writer.path)
  assert got["a/b"] == [(5, 1.0), (7, -3.5)] and np.isnan(got["c"][0][1])
  assert [e.step for e in read_events(writer.path)] == [0, 0, 5, 7]
  try:
    writer.write(8, {"x": "text"})
  except TypeError as err:
    assert "'x'" in str(err)
  else:
    raise AssertionError("a non-numeric scalar was accepted")
  writer.close()
  writer.close()
  try:
    writer.write(9, {"a/b": 1.0})
  except ValueError as err:
    assert "closed" in str(err)
  else:
    raise AssertionError("wrote after close")
  # A second writer (a resumed run) adds its own file beside the first.
  with TensorBoardWriter(tmp_path / "tb") as again:
    again.write(9, {"a/b": 2.0})
  files = sorted((tmp_path / "tb").iterdir())
  assert len(files) == 2 and scalars_of(again.path) == {"a/b": [(9, 2.0)]}


if __name__ == "__main__":
  main(sys.argv)
