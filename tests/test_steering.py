"""DFQ's cost loss steers the gate: behaviour on real images, not only formulas.

Short runs of gated ResNet-8 on a small cut of the real CIFAR-10 JPEGs. The
runs are short and the batch small (32, not 128), so beta is raised from the
recipe's 1e-3 to 1e-2 where the test needs the steering cp to travel; the
recipe-level test keeps every recipe value.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import dfq_cifar10, frac_cifar10
from fractrain_jax import cost, models
from fractrain_jax.run import train

# Candidates (3,4,4,6,6) / (6,6,8,8,12), 4-bit weights: the reachable steering cp.
FLOOR, CEILING = cost.steer_cp_range((3, 4, 4, 6, 6), (6, 6, 8, 8, 12), 4)


def short_run(config, folder, workdir, *, iters):
  config.model.name = "resnet8"
  config.data.dataset = f"folder:{folder}"
  config.train.iters = iters
  config.train.batch_size = 32
  config.train.eval_every = 25
  config.train.eval_batch_size = 100
  config.train.num_devices = 1
  config.optim.boundaries = (iters,)
  train.train_and_evaluate(config, workdir)
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["resnet20", "resnet38", "resnet74"])
@pytest.mark.parametrize("weighting", ["blocks", "macs"])
def test_reachable_range_is_the_authors_for_every_cifar_resnet(name, weighting):
  model = nnx.eval_shape(lambda: models.create(f"gated_{name}", num_classes=10,
                                               rngs=nnx.Rngs(0)))
  weights = cost.block_weights(model.layer_macs(), weighting)
  a, g, w = model.fw_candidates, model.bw_candidates, model.weight_bits
  every = lambda k: jax.nn.one_hot(jnp.full((model.num_blocks, 2), k), len(a))
  cheapest, dearest = float(cost.steer_cp(every(0), weights, a, g, w)), float(
      cost.steer_cp(every(len(a) - 1), weights, a, g, w))
  assert (round(cheapest, 3), round(dearest, 3)) == (1.758, 4.688) == (round(FLOOR, 3),
                                                                     round(CEILING, 3))
  lo, hi = cost.steer_cp_range((3, 4, 6, 8), (6, 8, 12, 16), 6)  # ImageNet candidates.
  assert (round(lo, 3), round(hi, 3)) == (2.344, 8.854)


def test_dfq_ends_near_its_target(real_cifar10_folder, tmp_path):
  # The gate starts near 2.9: 2.3 asks it to move down, 4.3 (near the top) up. One test
  # runs both, in turn: the second finds the first's compiled steps in the cache.
  for target in (2.3, 4.3):
    config = dfq_cifar10.get_config()
    config.dfq.target_cp = target
    config.dfq.beta = 1e-2
    lines = short_run(config, real_cifar10_folder, tmp_path / str(target), iters=200)
    first, last = lines[0]["steer_cp"], lines[-1]["steer_cp"]
    assert abs(first - target) > 0.5, target  # It had to travel...
    assert abs(last - target) <= 0.5, (target, [l["steer_cp"] for l in lines])  # ...and got there.
    assert FLOOR <= last <= CEILING


def test_dfq_and_fractrain_recipes_train_differently(real_cifar10_folder, tmp_path):
  runs = {}
  for name, recipe in (("dfq", dfq_cifar10), ("frac", frac_cifar10)):
    runs[name] = short_run(recipe.get_config(), real_cifar10_folder, tmp_path / name, iters=50)
  dfq_lines, frac_lines = runs["dfq"], runs["frac"]
  # FracTrain's first target (1.5) lies below the floor: its cost term pushes
  # down at every step. DFQ's (3) lies above where the gate starts.
  assert all(l["train_cost_term"] > 0 for l in frac_lines)
  assert dfq_lines[0]["train_cost_term"] < frac_lines[0]["train_cost_term"]
  assert [l["train_loss"] for l in dfq_lines] != [l["train_loss"] for l in frac_lines]
  assert [l["steer_cp"] for l in dfq_lines] != [l["steer_cp"] for l in frac_lines]
