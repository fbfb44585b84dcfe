"""End-to-end training runs: every method, resume, sharding, failures (tiny models, mock data)."""

import json
import logging
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

from configs import default
from fractrain_jax import methods, steps
from fractrain_jax.run import checkpoints, train

REPO = pathlib.Path(__file__).resolve().parents[1]
METRIC_KEYS = {"step", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
               "stage", "fw_bits", "bw_bits", "target_cp", "steer_cp", "model_cp", "cost",
               "cost_fw", "cost_eb", "cost_gc", "cost_paper", "cost_quantized", "train_cost_term",
               "wall_s"}
SUMMARY_KEYS = {"final_test_acc", "best_test_acc", "total_cost", "turning_points", "wall_s",
                "cost_fp32", "cost_sbm8", "cost_paper", "cost_quantized", "cost_quantized_sbm8",
                "mean_model_cp", "mean_steer_cp"}


def tiny_config(method_name: str, **overrides):
  config = default.get_config()
  config.method = method_name
  config.model.name = "resnet8"
  config.train.iters = 4
  config.train.batch_size = 8
  config.train.eval_every = 2
  config.train.eval_batch_size = 8
  config.train.log_every = 1
  config.train.num_devices = 1
  config.optim.boundaries = (3,)
  config.dfq.fw_candidates = (3, 6)
  config.dfq.bw_candidates = (6, 12)
  config.dfq.target_cp = 4.0
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def run_mock(config, workdir, **kwargs):
  with tfds.testing.mock_data(num_examples=16):
    return train.train_and_evaluate(config, workdir, **kwargs)


def read_metrics(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def final_params(config, workdir):
  """The parameters of the workdir's latest checkpoint, as NumPy."""
  model = methods.get(config.method).create_model(config, 10, config.seed)
  trainer = steps.Trainer(config, model, mean=(0, 0, 0), std=(1, 1, 1))
  state, run = checkpoints.Checkpoints(pathlib.Path(workdir), 3).restore(trainer.abstract_state())
  return jax.device_get(state.params), run


@pytest.mark.parametrize("method", ["fp32", "static", "pfq", "dfq", "frac", "dfq_per_candidate"])
def test_each_method_trains_end_to_end(method, tmp_path):
  if method == "dfq_per_candidate":  # DFQ with the authors' per-candidate block forward.
    method, config = "dfq", tiny_config("dfq", **{"dfq.forward": "per_candidate"})
  else:
    config = tiny_config(method)
  summary = run_mock(config, tmp_path)
  lines = read_metrics(tmp_path)
  assert [l["step"] for l in lines] == [2, 4]
  for line in lines:
    assert METRIC_KEYS <= set(line)
    assert math.isfinite(line["train_loss"]) and 0 <= line["test_acc"] <= 100
  assert SUMMARY_KEYS <= set(summary)
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  # Whole-training cost against the per-step references of the same iterations.
  if method == "fp32":
    assert summary["total_cost"] == pytest.approx(summary["cost_fp32"], rel=1e-6)
    assert summary["cost_paper"] == pytest.approx(summary["cost_fp32"], rel=1e-6)
    assert lines[-1]["model_cp"] == pytest.approx(100.0)
  elif method == "static":
    assert summary["total_cost"] == pytest.approx(summary["cost_sbm8"], rel=1e-6)
    # 1/16 of FP32 for the convs; the classifier stays full precision.
    assert lines[-1]["model_cp"] == pytest.approx(
        100 * summary["cost_sbm8"] / summary["cost_fp32"], rel=1e-5)
    assert 100 / 16 < lines[-1]["model_cp"] < 100 / 15
    assert summary["mean_steer_cp"] is None and lines[-1]["steer_cp"] is None
    # The paper's convention charges SBM 8/8 at 6.25 % of FP32, the classifier included.
    assert summary["cost_paper"] == pytest.approx(summary["cost_fp32"] / 16, rel=1e-6)
    assert summary["cost_quantized"] == pytest.approx(summary["cost_quantized_sbm8"], rel=1e-6)
  elif method == "pfq":
    assert (lines[0]["fw_bits"], lines[0]["bw_bits"]) == (3, 6)
    assert summary["total_cost"] < summary["cost_sbm8"]
  else:
    assert lines[-1]["target_cp"] == pytest.approx(4.0 if method == "dfq" else 4.0)
    ratios = np.asarray(lines[-1]["choice_ratio"])
    assert ratios.shape[1] == 2
    np.testing.assert_allclose(ratios.sum(axis=1), 1.0, rtol=1e-5)
    # The steering cp lies between the all-cheapest and all-dearest choices
    # ((3, 6) and (6, 12) with 4-bit weights); the whole model costs more, since
    # its stem, shortcuts and classifier run at 32 bits.
    assert 54 / 30.72 - 1e-4 <= lines[-1]["steer_cp"] <= 144 / 30.72 + 1e-4
    assert lines[-1]["model_cp"] > lines[-1]["steer_cp"]
    # The paper's convention: mean steering cp times the FP32 cost.
    mean_steer = np.mean([l["steer_cp"] for l in lines])
    assert summary["mean_steer_cp"] == pytest.approx(mean_steer, rel=1e-5)
    assert summary["cost_paper"] == pytest.approx(mean_steer / 100 * summary["cost_fp32"],
                                                  rel=1e-5)
  assert (tmp_path / "checkpoints").is_dir()
  assert any((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize("how", ["stop_at", "sigint"])
def test_resume_continues_exactly(tmp_path, monkeypatch, how):
  config = tiny_config("frac", **{"train.iters": 6})
  straight = tmp_path / "straight"
  split = tmp_path / "split"
  run_mock(config, straight)
  # Stopped mid-interval, after step 3: the interval's sums must persist too.
  if how == "stop_at":
    stopped = run_mock(config, split, stop_at=3)
  else:  # Ctrl-C while step 3 runs: the loop finishes it, saves, and stops.
    add = train.IntervalMetrics.add
    calls = []

    def add_then_interrupt(self, metrics):
      add(self, metrics)
      calls.append(1)
      if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train.IntervalMetrics, "add", add_then_interrupt)
    stopped = run_mock(config, split)
    monkeypatch.undo()
  assert stopped == ({"stopped_at": 3} if how == "stop_at" else {"stopped_at": 3, "signal": 2})
  assert not (split / "summary.json").exists()
  run_mock(config, split)
  p1, m1 = final_params(config, straight)
  p2, m2 = final_params(config, split)
  chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-6)
  a, b = read_metrics(straight), read_metrics(split)
  assert [l["step"] for l in b] == [2, 4, 6]
  for la, lb in zip(a, b):
    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "steer_cp", "model_cp",
              "cost", "cost_paper", "lr"):
      assert la[k] == pytest.approx(lb[k], rel=1e-5, abs=1e-6), k
  assert m1.indicator == m2.indicator


@pytest.mark.parametrize("method,rtol", [
    ("fp32", 1e-5),
    # Quantized runs: the quantizers are sharding-invariant (test_quant), but the
    # devices sum BN statistics in another order, and a last-bit difference that
    # lands on a rounding threshold moves a value by a whole quantization step.
    ("dfq", 2e-2),
])
def test_two_devices_give_the_result_of_one(tmp_path, method, rtol):
  assert jax.device_count() >= 2
  one = tiny_config(method, **{"train.num_devices": 1})
  two = tiny_config(method, **{"train.num_devices": 2})
  run_mock(one, tmp_path / "one")
  run_mock(two, tmp_path / "two")
  p1, _ = final_params(one, tmp_path / "one")
  p2, _ = final_params(two, tmp_path / "two")
  if method == "fp32":
    chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)
  for la, lb in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")):
    assert la["train_loss"] == pytest.approx(lb["train_loss"], rel=rtol)
    assert la["model_cp"] == pytest.approx(lb["model_cp"], rel=rtol)


def test_pfq_compiles_once_per_stage(tmp_path, monkeypatch):
  # Four stages: four traces of the train step, none more (chex raises on a fifth).
  monkeypatch.setattr(steps.Trainer, "_train_step",
                      chex.assert_max_traces(steps.Trainer._train_step, n=4))
  # A two-epoch window and a huge threshold: a turning point every two epochs.
  config = tiny_config("pfq", **{"train.iters": 8, "train.eval_every": 1, "pfq.window": 2,
                                 "pfq.eps": 1e6})
  summary = run_mock(config, tmp_path)
  assert summary["turning_points"] == [2, 4, 6]
  lines = read_metrics(tmp_path)
  assert [l["stage"] for l in lines] == [0, 0, 1, 1, 2, 2, 3, 3]
  assert [(l["fw_bits"], l["bw_bits"]) for l in lines[::2]] == [(3, 6), (4, 6), (6, 8), (8, 8)]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
  config = tiny_config("fp32", **{"train.iters": 6, "optim.lr": 1e30,
                                  "optim.boundaries": (100,)})
  with pytest.raises(FloatingPointError,
                     match="(training loss|test loss|gradient norm) became nan at step [12]"):
    run_mock(config, tmp_path)
  # A run that diverged before its first checkpoint leaves no (empty) checkpoints/ folder.
  folder = tmp_path / "checkpoints"
  steps_saved = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
      if folder.exists() else []
  assert all(s < 6 for s in steps_saved)


def test_missing_dataset_fails_fast(tmp_path):
  config = tiny_config("fp32", **{"data.data_dir": str(tmp_path / "empty"),
                                  "data.download": False})
  t0 = time.monotonic()
  with pytest.raises(FileNotFoundError, match="folder:"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert time.monotonic() - t0 < 30


def test_offline_the_default_download_fails_in_one_line_within_a_minute(tmp_path, monkeypatch):
  from fractrain_jax.data import tfds_prepare  # pylint: disable=import-outside-toplevel

  with socket.socket() as closed:  # A loopback port nobody listens on: refused at once.
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
  monkeypatch.setattr(tfds_prepare, "download_urls",
                      lambda builder: [f"https://127.0.0.1:{port}/cifar-10-binary.tar.gz"])
  data_dir = tmp_path / "tfds"
  config = tiny_config("fp32", **{"data.data_dir": str(data_dir)})
  assert config.data.download  # The default: CIFAR downloads on a fresh machine.
  t0 = time.monotonic()
  with pytest.raises(FileNotFoundError) as info:
    train.train_and_evaluate(config, tmp_path / "run")
  assert time.monotonic() - t0 < 60
  message = str(info.value)
  assert "\n" not in message and f"127.0.0.1:{port}: Connection refused" in message, message
  assert "--config.data.data_dir=" in message and "--config.data.dataset=folder:PATH" in message
  assert not data_dir.exists()  # Nothing half-downloaded.


@pytest.mark.parametrize("key,value", [("method", "int4"), ("model.name", "resnet9"),
                                       ("quant.fw_bits", 33), ("train.iters", 0)])
def test_bad_config_is_refused_with_the_value(tmp_path, key, value):
  config = tiny_config("static", **{key: value})
  with pytest.raises(ValueError, match=str(value)):
    train.train_and_evaluate(config, tmp_path)


def test_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match=str(blocker)):
    train.train_and_evaluate(tiny_config("fp32"), blocker / "run")


def _image_folder(root: pathlib.Path, per_class: int = 6) -> pathlib.Path:
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for cls in ("cat", "dog"):
      d = root / split / cls
      d.mkdir(parents=True)
      for i in range(per_class):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(d / f"{i}.png")
  return root


def test_main_trains_on_an_image_folder_and_evaluates_its_checkpoint(tmp_path):
  folder = _image_folder(tmp_path / "images")
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  common = [sys.executable, "main.py", "--config", "configs/sbm_cifar10.py",
            f"--config.data.dataset=folder:{folder}", "--config.model.name=resnet8",
            "--config.train.iters=2", "--config.train.batch_size=4",
            "--config.train.eval_every=2", "--config.train.eval_batch_size=4",
            f"--workdir={tmp_path / 'run'}"]
  done = subprocess.run(common, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["dataset"] == f"folder:{folder}" and summary["iters"] == 2
  ev = subprocess.run(common + ["--eval_only"], cwd=REPO, env=env, capture_output=True,
                      text=True, timeout=600)
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert f"'test_acc': {summary['final_test_acc']}" in ev.stdout


def test_streamed_imagenet_path_trains_and_evaluates(tmp_path):
  # The tf.data pipeline and device prefetch of imagenet2012, at 32x32 crops.
  config = tiny_config("static", **{"data.dataset": "imagenet2012", "model.name": "resnet18",
                                    "data.image_size": 32, "train.iters": 2,
                                    "train.batch_size": 4, "train.eval_batch_size": 4})
  # 16 batches an epoch: the prefetch thread never starts a second epoch's
  # tf.data pipeline, whose mocked file system (process-wide, not thread-safe)
  # would race the evaluation's.
  with tfds.testing.mock_data(num_examples=64):
    summary = train.train_and_evaluate(config, tmp_path)
  (line,) = read_metrics(tmp_path)
  assert line["step"] == 2 and math.isfinite(line["train_loss"])
  assert summary["dataset"] == "imagenet2012" and 0 <= summary["final_test_acc"] <= 100


@pytest.mark.parametrize("method", ["pfq", "frac"])
def test_full_precision_finetuning_follows_the_last_iteration(tmp_path, method):
  config = tiny_config(method, **{"train.iters": 2, "train.finetune_iters": 2})
  summary = run_mock(config, tmp_path)
  first, last = read_metrics(tmp_path)
  assert (first["phase"], last["phase"]) == ("train", "finetune")
  assert first["model_cp"] < 100 and last["model_cp"] == pytest.approx(100.0)
  # The fine-tuning interval costs what two FP32 steps cost.
  assert last["cost"] - first["cost"] == pytest.approx(summary["cost_fp32"] / 2, rel=1e-6)


@pytest.mark.parametrize("weighting", ["blocks", "macs"])
@pytest.mark.parametrize("target,sign", [(1.0, 1.0), (4.6, -1.0)])
def test_step_cost_term_is_the_authors_batch_total(weighting, target, sign):
  config = tiny_config("frac", **{"dfq.cost_weighting": weighting})
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  y = jax.numpy.arange(8) % 10
  model = methods.get(config.method).create_model(config, 10, 0)
  trainer = steps.Trainer(config, model, mean=(0, 0, 0), std=(1, 1, 1))
  params, rest = trainer._init
  key = jax.random.key(1)
  loss, (metrics, _) = trainer._loss(params, rest, x, y, key, methods.GATED,
                                     jax.numpy.float32(target), 1.0, trainer.train_graphdef)
  # The same forward pass again, for the gate's per-sample choices.
  _, masks = nnx.merge(trainer.train_graphdef, params, rest, copy=True)(x, key=key, tau=1.0)
  choice = np.argmax(np.asarray(masks), axis=-1)  # (blocks, batch)
  a, g, w = config.dfq.fw_candidates, config.dfq.bw_candidates, config.dfq.weight_bits
  layers = model.layer_macs()
  if weighting == "blocks":
    weights = np.ones(model.num_blocks)
  else:
    weights = np.zeros(model.num_blocks)
    for l in layers:
      if l.kind == "gated":
        weights[l.block] += l.macs
  unit = np.array([(ak * w + gk * w + ak * gk) / 1024 for ak, gk in zip(a, g)])
  total = sum(weights[l] * unit[choice[l, n]] for l in range(len(weights)) for n in range(8))
  want = sign * config.dfq.beta * total / weights.mean()
  assert float(metrics["cost_term"]) == pytest.approx(want, rel=1e-5)
  assert float(loss - metrics["ce"]) == pytest.approx(want, rel=1e-3)
  cp = sum(weights[l] * unit[choice[l, n]] / 8 for l in range(len(weights))
           for n in range(8)) / (3 * weights.sum()) * 100
  assert float(metrics["steer_cp"]) == pytest.approx(cp, rel=1e-5)


@pytest.mark.parametrize("method,target,warned", [("dfq", 1.0, "1"), ("dfq", 3.0, None),
                                                   ("frac", 1.5, "1.5"), ("frac", 4.5, "5, 5.5, 6")])
def test_a_target_outside_the_reachable_range_is_warned_about(tmp_path, caplog, method, target,
                                                               warned):
  config = tiny_config(method, **{"train.iters": 2, "dfq.target_cp": target})
  with caplog.at_level(logging.INFO, logger="fractrain_jax"):
    run_mock(config, tmp_path)
  # Candidates (3, 6) and (6, 12) with 4-bit weights.
  assert "1.758% (every block at the cheapest) to 4.688%" in caplog.text
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and "reachable steering-cp range" in r.getMessage()]
  if warned is None:
    assert not warnings
  else:
    (message,) = warnings
    assert message.startswith(f"target cp {warned} outside") and "1.758-4.688%" in message


def test_the_loops_epoch_order_gives_the_steps_own_batches():
  """The loop hands the step each epoch's permutation (computed once per epoch); the
  states after steps across an epoch boundary equal those of steps permuting themselves."""
  config = tiny_config("fp32")
  model = methods.get("fp32").create_model(config, 10, config.seed)
  trainer = steps.Trainer(config, model, mean=(0, 0, 0), std=(1, 1, 1))
  rng = np.random.default_rng(0)
  arrays = trainer.put_replicated((rng.integers(0, 256, (20, 32, 32, 3), np.uint8),
                                   rng.integers(0, 10, (20,), np.int32)))
  step = trainer.train_step(methods.get("fp32").step_precision(config, 0))
  zero = jax.numpy.float32(0.0)
  own = trainer.init_state(0)
  given = jax.tree.map(jax.numpy.copy, own)  # Donation would delete shared buffers.
  for i in range(3):  # Two steps per epoch (20 // 8).
    own, own_metrics = step(own, arrays, zero, zero)
    order = trainer.epoch_order(given, i // 2, 20)
    given, given_metrics = step(given, (*arrays, order), zero, zero)
    chex.assert_trees_all_equal((own, own_metrics), (given, given_metrics))
