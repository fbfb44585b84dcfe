"""Models of the user's own (``config.model.name = "package.module:factory"``) trained end to end.

The three plain-nnx models of ``examples/user_models.py`` train with every
method through the library's ``train_and_evaluate`` (metrics, a checkpoint,
and an exact resume from the checkpoint before the last), through
``main.py`` with the factory, blocks and options given on its command line,
and DFQ steers the ViT to a target inside its reachable range on real
CIFAR-10 images.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from fractrain_jax import cost
from fractrain_jax.run import train
from fractrain_jax.errors import ConfigError
from test_lm import write_corpus
from test_train import _image_folder

REPO = pathlib.Path(__file__).resolve().parents[1]
# name -> (factory, its options, gated block patterns, data).
MODELS = {
    "resnet": ("examples.user_models:resnet", {"depth": 8}, (r"blocks/\d+",), "images"),
    "vit": ("examples.user_models:vit", {"width": 16, "depth": 2, "patch": 8, "heads": 2},
            (r"blocks/\d+",), "images"),
    "gpt": ("examples.user_models:gpt", {"width": 16, "depth": 1, "heads": 2, "context": 8},
            (r"blocks/\d+/(attn|mlp)",), "text"),
}
METHODS = ("fp32", "static", "pfq", "dfq", "frac")
# The methods each model resumes with: all of them on the ViT; FracTrain (a stage change,
# the indicator's and the gate's state) on the others, whose resume is otherwise the same
# code (CI time: each resume compiles its step again).
RESUMED = {"resnet": ("frac",), "vit": METHODS, "gpt": ("frac",)}
A, G = (3, 6), (6, 12)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return {"images": f"folder:{_image_folder(root / 'images', per_class=8)}",
          "text": write_corpus(root)}


def user_config(model: str, method: str, dataset: str, **overrides):
  factory, options, blocks, _ = MODELS[model]
  config = default.get_config()
  config.method = method
  config.model.name = factory
  config.model.options.update(options)
  config.model.blocks = blocks
  config.data.dataset = dataset
  if dataset.startswith("text:"):
    config.model.lm.context = options["context"]
    config.data.update(text_train="valid", text_test="test")
  config.train.update(iters=6, batch_size=8, eval_every=2, eval_batch_size=8, log_every=1,
                      num_devices=1)
  config.optim.boundaries = (5,)
  # One turning point once two interval losses are held (eps 10): PFQ's and
  # FracTrain's second stage starts at step 4.
  config.pfq.update(fw_schedule=(4, 8), bw_schedule=(8, 8), num_turning_points=1, window=2,
                    scale_epochs=1, eps=10.0)
  config.dfq.update(fw_candidates=A, bw_candidates=G, target_cp=3.0, target_step=0.5)
  config.update_from_flattened_dict(overrides)
  return config


def lines(workdir) -> list[dict]:
  text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
  return [{k: v for k, v in json.loads(l).items() if k != "wall_s"} for l in text.splitlines()]


def resume_from_the_checkpoint_before_the_last(config, workdir) -> tuple[list, list]:
  """The record of a finished run, and the record after resuming it from its step-4 checkpoint."""
  before = lines(workdir)
  shutil.rmtree(pathlib.Path(workdir) / "checkpoints" / "6")
  (pathlib.Path(workdir) / "summary.json").unlink()
  train.train_and_evaluate(config, workdir)
  return before, lines(workdir)


@pytest.mark.parametrize("model", list(MODELS))
def test_a_model_of_your_own_trains_with_every_method_and_resumes_exactly(model, datasets,
                                                                        tmp_path):
  num_blocks = 2 if model != "resnet" else 3
  for method in METHODS:
    config = user_config(model, method, datasets[MODELS[model][3]])
    workdir = tmp_path / method
    summary = train.train_and_evaluate(config, workdir)
    assert summary["model"] == MODELS[model][0] and summary["iters"] == 6
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]
    record = lines(workdir)
    assert [l["step"] for l in record] == [2, 4, 6]
    if method in ("dfq", "frac"):
      ratios = np.asarray(record[-1]["choice_ratio"])
      assert ratios.shape == (num_blocks, len(A))
      lo, hi = cost.steer_cp_range(A, G, 4)
      assert lo <= record[-1]["steer_cp"] <= hi
    if method in ("pfq", "frac"):
      assert summary["turning_points"] == [4]
    if method == "pfq":
      assert [l["fw_bits"] for l in record] == [4, 4, 8]
    if method == "static":
      assert summary["cost_quantized"] == pytest.approx(summary["cost_quantized_sbm8"])
    if MODELS[model][3] == "text":
      assert "final_test_ppl" in summary
    if method in RESUMED[model]:  # Step 6 done again from the step-4 checkpoint: the same run.
      before, after = resume_from_the_checkpoint_before_the_last(config, workdir)
      assert after == before, method


def test_blocks_are_required_for_the_gated_methods_and_refused_for_the_zoo(datasets):
  config = user_config("vit", "dfq", datasets["images"], **{"model.blocks": ()})
  with pytest.raises(ConfigError, match="config.model.blocks is empty; dfq gates blocks"):
    train.train_and_evaluate(config, "/tmp/unused-never-written")
  config = user_config("vit", "pfq", datasets["images"], **{"model.name": "resnet8"})
  with pytest.raises(ConfigError, match=r"config.model.blocks=.* is for a model of your own"):
    train.train_and_evaluate(config, "/tmp/unused-never-written")
  config = user_config("vit", "pfq", datasets["images"], **{"model.name": "examples.nothere:vit"})
  with pytest.raises(ConfigError, match="cannot import examples.nothere"):
    train.train_and_evaluate(config, "/tmp/unused-never-written")
  config = user_config("vit", "pfq", datasets["images"],
                       **{"model.name": "examples.user_models:vits"})
  with pytest.raises(ConfigError, match="has no callable 'vits'; its own callables: .*vit"):
    train.train_and_evaluate(config, "/tmp/unused-never-written")
  config = user_config("vit", "dfq", datasets["images"], **{"dfq.forward": "per_candidate"})
  with pytest.raises(ConfigError, match="a model of your own runs 'single' only"):
    train.train_and_evaluate(config, "/tmp/unused-never-written")


def _main(workdir, model, dataset, method, *extra):
  factory, options, blocks, _ = MODELS[model]
  cmd = [sys.executable, "main.py", "--config", f"configs/{method}_cifar10.py",
         f"--config.model.name={factory}", f"--config.model.options={options!r}",
         f"--config.model.blocks={blocks!r}", f"--config.data.dataset={dataset}",
         "--config.train.iters=4", "--config.train.eval_every=2", "--config.train.batch_size=8",
         "--config.train.eval_batch_size=8", f"--workdir={workdir}", *extra]
  if dataset.startswith("text:"):
    cmd += [f"--config.model.lm.context={options['context']}", "--config.data.text_train=valid",
            "--config.data.text_test=test"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc) -> str:
  try:
    out, err = proc.communicate(timeout=600)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  return out + err


def test_main_py_trains_a_model_of_your_own_named_on_its_command_line(datasets, tmp_path):
  runs = {"vit": ("frac", datasets["images"]), "gpt": ("dfq", datasets["text"]),
          "resnet": ("pfq", datasets["images"])}
  procs = {m: _main(tmp_path / m, m, data, method) for m, (method, data) in runs.items()}
  logs = {m: _finish(p) for m, p in procs.items()}
  # The parameter table names every layer's precision.
  assert "blocks/1/mlp/fc2" in logs["vit"] and "gated block 1" in logs["vit"]
  assert "patch_embed" in logs["vit"] and "full precision" in logs["vit"]
  assert "blocks/0/attn/q" in logs["gpt"] and "Einsum" in logs["gpt"]
  for m in runs:
    summary = json.loads((tmp_path / m / "summary.json").read_text())
    assert summary["model"] == MODELS[m][0] and summary["iters"] == 4
  # The same command resumes: from the step-2 checkpoint, to the same step-4 line.
  before = lines(tmp_path / "vit")
  shutil.rmtree(tmp_path / "vit" / "checkpoints" / "4")
  _finish(_main(tmp_path / "vit", "vit", datasets["images"], "frac"))
  assert lines(tmp_path / "vit") == before


def test_dfq_steers_a_user_vit_to_its_target_on_cifar10(real_cifar10_folder, tmp_path):
  # As test_steering's gated ResNet-8: a short run at batch 32, so beta 1e-2, not 1e-3.
  # The per-token gate starts near 2.9, the CIFAR candidates' mean; 2.3 asks it down.
  config = user_config("vit", "dfq", f"folder:{real_cifar10_folder}",
                       **{"train.iters": 200, "train.batch_size": 32, "train.eval_every": 25,
                          "train.eval_batch_size": 100, "dfq.fw_candidates": (3, 4, 4, 6, 6),
                          "dfq.bw_candidates": (6, 6, 8, 8, 12), "dfq.target_cp": 2.3,
                          "dfq.beta": 1e-2, "optim.boundaries": ()})
  train.train_and_evaluate(config, tmp_path)
  cps = [l["steer_cp"] for l in lines(tmp_path)]
  assert abs(cps[0] - 2.3) > 0.5, cps  # It had to travel...
  assert abs(cps[-1] - 2.3) <= 0.3, cps  # ...and got there.


def test_the_own_loop_example_trains_with_the_library_step_and_indicator(real_cifar10_folder,
                                                                         capsys):
  from examples import own_loop  # pylint: disable=import-outside-toplevel

  # eps 10: every full window of three epoch losses is a plateau, so both turning points come.
  result = own_loop.main(["--folder", str(real_cifar10_folder), "--steps", "24", "--epoch", "4",
                          "--examples", "200", "--eps", "10"])
  out = capsys.readouterr().out
  assert result["turning_point_epochs"] == [3, 6] and result["stage"] == 2
  assert "turning point, target now 2.5%" in out and "turning point, target now 3%" in out
  assert out.count("steering cp") == 6  # One line per indicator epoch.
  assert 0.0 <= result["test_acc"] <= 100.0 and np.isfinite(result["test_loss"])
