"""Extending the library from outside it: a new method and a new data source, one object each.

Both are defined and registered here, in the test file alone, and trained end
to end through ``train_and_evaluate`` (metrics, checkpoint, exact resume); no
library file knows them. The layering rules that keep this possible are
checked too: no library module imports a recipe, ``main`` or ``report``, and
no module but ``methods.py`` compares a method's name (``test_layout.py``
checks the direction of the package's own imports).
"""

from __future__ import annotations

import ast
import json
import pathlib

import numpy as np
import pytest

from configs import default
from fractrain_jax import data, methods
from fractrain_jax.run import checkpoints, train

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = REPO / "fractrain_jax"


class TwoStage(methods.Method):
  """Static 4/8 bits, then 8/8 from a fixed step on: a schedule without the indicator."""

  name = "two_stage"

  def __init__(self, switch_at: int):
    self.switch_at = switch_at

  def precision(self, config, stage):
    return methods.Precision(((4, 8), (8, 8))[stage])

  def turning_point(self, config, step, indicator, record):
    return step == self.switch_at

  def identity(self, config):
    return {"switch_at": self.switch_at}


class Npz(data.Source):
  """``npz:PATH``: one .npz file holding uint8 images and int32 labels of both splits."""

  kind = "npz"
  forms = ("npz:PATH",)
  statistics = "measured"

  def claims(self, dataset):
    return dataset.startswith("npz:")

  def load(self, config):
    arrays = np.load(config.data.dataset[len("npz:"):])
    train_images = arrays["train_images"]
    # No published statistics: measured on the training split.
    mean = tuple(float(m) for m in train_images.mean(axis=(0, 1, 2)) / 255)
    std = tuple(float(s) for s in train_images.std(axis=(0, 1, 2)) / 255)
    return data.ArrayData(train_images, arrays["train_labels"], arrays["test_images"],
                          arrays["test_labels"], num_classes=int(arrays["train_labels"].max()) + 1,
                          mean=mean, std=std)


@pytest.fixture
def two_stage():
  method = methods.register(TwoStage(switch_at=4))
  yield method
  methods.unregister(method.name)


@pytest.fixture
def npz_file(tmp_path):
  source = data.register_source(Npz())
  rng = np.random.default_rng(0)
  path = tmp_path / "tiny.npz"
  np.savez(path, train_images=rng.integers(0, 256, (24, 16, 16, 3), np.uint8),
           train_labels=(np.arange(24) % 3).astype(np.int32),
           test_images=rng.integers(0, 256, (9, 16, 16, 3), np.uint8),
           test_labels=(np.arange(9) % 3).astype(np.int32))
  yield path
  data.unregister_source(source.kind)


def tiny(method: str, dataset: str, iters: int = 6):
  config = default.get_config()
  config.method = method
  config.model.name = "resnet8"
  config.data.dataset = dataset
  config.train.update(iters=iters, batch_size=8, eval_every=2, eval_batch_size=9, log_every=1,
                      num_devices=1)
  config.optim.boundaries = (iters,)
  return config


def lines(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def whole_and_resumed(config, tmp_path):
  whole = train.train_and_evaluate(config, tmp_path / "whole")
  assert train.train_and_evaluate(config, tmp_path / "split", stop_at=3) == {"stopped_at": 3}
  resumed = train.train_and_evaluate(config, tmp_path / "split")
  drop_wall = lambda d: {k: v for k, v in d.items() if k != "wall_s"}
  assert drop_wall(resumed) == drop_wall(whole)
  assert ([drop_wall(l) for l in lines(tmp_path / "split")]
          == [drop_wall(l) for l in lines(tmp_path / "whole")])
  return whole, lines(tmp_path / "whole")


def test_a_method_registered_here_trains_checkpoints_and_resumes(two_stage, npz_file, tmp_path):
  config = tiny("two_stage", f"npz:{npz_file}")
  summary, metrics = whole_and_resumed(config, tmp_path)
  assert [(l["fw_bits"], l["bw_bits"]) for l in metrics] == [(4, 8), (4, 8), (8, 8)]
  assert summary["turning_points"] == [4]
  # Two thirds of the steps at 4/8 bits, one third at 8/8: cheaper than SBM 8/8.
  assert summary["cost_quantized"] < summary["cost_quantized_sbm8"]
  identity = checkpoints.Checkpoints(tmp_path / "whole", 3).read_meta(6).identity
  assert identity == {"method": "two_stage", "model": "resnet8", "dataset": f"npz:{npz_file}",
                      "normalization": "measured", "switch_at": 4}


def test_a_data_source_registered_here_trains_checkpoints_and_resumes(npz_file, tmp_path):
  assert data.find_source(f"npz:{npz_file}").kind == "npz"
  assert "npz:PATH" in data.accepted()
  summary, metrics = whole_and_resumed(tiny("pfq", f"npz:{npz_file}"), tmp_path)
  assert [l["step"] for l in metrics] == [2, 4, 6]
  assert all(0 <= l["test_acc"] <= 100 for l in metrics)
  assert summary["dataset"] == f"npz:{npz_file}"


def test_unregistered_names_are_refused_with_the_registered_ones():
  from fractrain_jax.run import config_check  # pylint: disable=import-outside-toplevel

  with pytest.raises(ValueError, match=r"config.method='two_stage'.*'fp32'.*'frac'"):
    config_check.validate(tiny("two_stage", "cifar10"))
  with pytest.raises(ValueError, match="unknown dataset 'npz:/x'; accepted: cifar10"):
    config_check.validate(tiny("fp32", "npz:/x"))


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names |= {f"{node.module}.{a.name}" for a in node.names}
  return names


@pytest.mark.parametrize("path", sorted(LIBRARY.rglob("*.py")), ids=lambda p: p.name)
def test_library_imports_no_recipe_entry_point_or_report(path):
  if path.parent.name == "report":  # The report's own modules import each other.
    return
  bad = {n for n in _imports(path) if n.split(".")[0] in ("configs", "main")
         or n == "fractrain_jax.report" or n.startswith("fractrain_jax.report.")}
  assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_no_module_but_methods_compares_a_method_name():
  """No ``config.method == "pfq"``, ``method in ("dfq", "frac")`` or ``r["method"] == "fp32"``
  outside methods.py ("static" and "frac" are also a layer kind and a cost rule's name:
  only comparisons that involve a method are counted)."""
  names = set(methods.names())
  found = []
  for path in sorted(LIBRARY.rglob("*.py")):
    if path.name == "methods.py":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if not (isinstance(node, ast.Compare) and "method" in ast.unparse(node)):
        continue
      for operand in [node.left, *node.comparators]:
        values = ([operand] if isinstance(operand, ast.Constant)
                  else list(getattr(operand, "elts", [])))
        for value in values:
          if isinstance(value, ast.Constant) and value.value in names:
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
  assert not found, found
