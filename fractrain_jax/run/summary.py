"""What ``summary.json`` holds: a finished run's results and costs, in one dict.

The keys are listed, with their meaning, in docs/DESIGN.md's table of the
workdir's files; ``report/runs.py`` reads them back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fractrain_jax import cost, steps

if TYPE_CHECKING:
  from fractrain_jax.run.checkpoints import Progress
  from fractrain_jax.run.setup import RunSetup


def summary(setup: RunSetup, progress: Progress) -> dict[str, Any]:
  """The run's results; an LM's adds its test loss and perplexity (final and best)."""
  config = setup.config
  samples = setup.total_iters * config.train.batch_size
  lm = {}
  if setup.trainer.task == "lm":
    lm = {"final_test_loss": progress.last_test_loss, "best_test_loss": progress.best_test_loss,
          "final_test_ppl": steps.perplexity(progress.last_test_loss),
          "best_test_ppl": steps.perplexity(progress.best_test_loss)}
  return {**lm,
      "method": config.method, "model": config.model.name, "dataset": config.data.dataset,
      "iters": setup.total_iters, "final_test_acc": progress.last_test_acc,
      "best_test_acc": progress.best_test_acc, "total_cost": sum(progress.cost),
      "cost_fw": progress.cost[0], "cost_eb": progress.cost[1], "cost_gc": progress.cost[2],
      "cost_paper": progress.cost_paper,
      "cost_fp32": cost.fp32_cost(setup.plain_layers).total * samples,
      "cost_sbm8": cost.static_cost(setup.plain_layers, (8, 8)).total * samples,
      # The layers this run quantizes, alone, and the same layers at SBM 8/8.
      "cost_quantized": progress.cost_quantized,
      "cost_quantized_sbm8": (cost.sbm8_quantized_cost(setup.trainer.layers).total
                              * samples),
      "mean_model_cp": progress.model_cp_sum / max(progress.cp_steps, 1),
      "mean_steer_cp": (progress.steer_cp_sum / progress.steer_cp_steps
                        if progress.steer_cp_steps else None),
      "turning_points": progress.turning_points, "wall_s": progress.wall_s,
  }
