r"""FracTrain inside your own training loop: attach it to your model, then step and decide yourself.

    python3 examples/own_loop.py --folder data/cifar10 --steps 400
    python3 examples/own_loop.py --steps 40      # random images, as a smoke test

What main.py does for you, written out: FracTrain is attached to a ViT written
with plain ``nnx`` layers (``examples/user_models.py``); each step is the
library's jitted train step (``steps.Trainer``: DFQ's gated forward, the cost
loss, the quantized backward, SGD), called with this stage's target cp and
the Gumbel temperature; every ``epoch`` steps PFQ's indicator reads the mean
loss and, at a turning point, FracTrain raises the target. No workdir, no
checkpoints: the loop is yours.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Run from anywhere.
from examples.user_models import vit  # noqa: E402  pylint: disable=wrong-import-position
from fractrain_jax import attach, data, defaults, dfq, methods, pfq, steps  # noqa: E402


def images(folder: str | None, examples: int):
  """uint8 training and test images with labels: an image folder's, or random ones."""
  if folder:
    d = data.load_arrays(f"folder:{folder}", train_subset=examples, test_subset=examples // 5,
                         measure_stats=True)
    return d.train_arrays(), (d.test_images, d.test_labels), d.num_classes, (d.mean, d.std)
  rng = np.random.default_rng(0)
  make = lambda n: (rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                    rng.integers(0, 10, (n,), np.int32))
  return make(examples), make(examples // 5), 10, ((0.5,) * 3, (0.25,) * 3)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--folder", help="an image folder (PATH/train/<class>/, PATH/test/<class>/)")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--epoch", type=int, default=20, help="steps per indicator epoch")
  parser.add_argument("--examples", type=int, default=5000, help="training images used")
  parser.add_argument("--eps", type=float, default=0.05, help="the indicator's threshold")
  args = parser.parse_args(argv)

  # The library's defaults, set for FracTrain at this scale.
  config = defaults.get_config()
  config.method = "frac"
  config.train.update(batch_size=32, iters=args.steps, num_devices=1)
  config.optim.update(lr=0.05, boundaries=())
  config.dfq.update(target_cp=2.0, target_step=0.5)
  config.pfq.update(num_turning_points=2, window=3, scale_epochs=2, eps=args.eps)
  method = methods.get(config.method)

  (train_x, train_y), (test_x, test_y), classes, (mean, std) = images(args.folder, args.examples)
  model = attach.attach(vit(classes, rngs=nnx.Rngs(0), width=64, depth=2),
                        jnp.zeros((1, 32, 32, 3)), blocks=[r"blocks/\d+"], rngs=nnx.Rngs(1),
                        fw_candidates=config.dfq.fw_candidates,
                        bw_candidates=config.dfq.bw_candidates,
                        weight_bits=config.dfq.weight_bits)
  trainer = steps.Trainer(config, model, mean=mean, std=std)  # The step augments on device.
  state = trainer.init_state(seed=0)
  train_set = trainer.put_replicated((train_x, train_y))
  indicator = pfq.TurningPointIndicator.from_config(config.pfq)
  step_fn = trainer.train_step(methods.GATED)  # Compiled once: targets and tau are traced.

  losses, cps = [], []
  for step in range(args.steps):
    target = method.target_cp(config, indicator.stage)
    tau = dfq.gumbel_tau(step, args.steps, config.dfq.tau_start, config.dfq.tau_end)
    state, metrics = step_fn(state, train_set, jnp.float32(target), tau)
    losses.append(metrics["ce"] + metrics["cost_term"])  # What FracTrain's indicator reads.
    cps.append(metrics["steer_cp"])
    if (step + 1) % args.epoch == 0:
      loss, cp = float(np.mean(jax.device_get(losses))), float(np.mean(jax.device_get(cps)))
      turned = indicator.update(loss)
      print(f"step {step + 1}: loss {loss:.3f}, steering cp {cp:.2f}% (target {target:g}%)"
            + (f"; turning point, target now {method.target_cp(config, indicator.stage):g}%"
               if turned else ""), flush=True)
      losses, cps = [], []

  valid = np.ones_like(test_y, bool)
  result = trainer.evaluate(state, [(test_x, test_y, valid)], methods.GATED)
  print(f"test accuracy {result['test_acc']:.2f}% after {args.steps} steps, "
        f"turning points at epochs {indicator.turning_point_epochs}")
  return {**result, "turning_point_epochs": list(indicator.turning_point_epochs),
          "stage": indicator.stage}


if __name__ == "__main__":
  main()
