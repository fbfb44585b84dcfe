"""FracTrain (SPEC section 5) on CIFAR-10: DFQ whose target cp rises 1.5 -> 3.0%.

PFQ's turning-point indicator raises the DFQ target by 0.5 at each of its 3
turning points: a steering cp of 1.5, 2.0, 2.5, 3.0 % (the authors' accounting:
the gated blocks' cost against FP32, each block weighted 1; with these
candidates it can reach 1.758-4.688 %, so the first target sits just below the
floor, as in the authors' README).

Run: ``python main.py --config configs/frac_cifar10.py --workdir /tmp/frac_c10``;
the paper's ResNet-74 row: ``--config.model.name=resnet74``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """FracTrain gated ResNet-38 on CIFAR-10."""
  config = default.get_config()
  # DFQ gate with a target raised at PFQ's turning points.
  config.method = "frac"
  # Weight bits of the gated convs (README: --weight_bits 4).
  config.dfq.weight_bits = 4
  # Forward bits of the 5 CIFAR candidates.
  config.dfq.fw_candidates = (3, 4, 4, 6, 6)
  # Backward bits of the 5 CIFAR candidates.
  config.dfq.bw_candidates = (6, 6, 8, 8, 12)
  # First target steering cp in % (README: --target_ratio 1.5).
  config.dfq.target_cp = 1.5
  # Raise per turning point (README: --target_ratio_step 0.5).
  config.dfq.target_step = 0.5
  # Indicator threshold epsilon (README: --initial_threshold 0.05).
  config.pfq.eps = 0.05
  # Threshold decay alpha (README: --decay 0.3).
  config.pfq.alpha = 0.3
  # Three raises: targets 1.5, 2.0, 2.5, 3.0.
  config.pfq.num_turning_points = 3
  # The FracTrain script keeps its running activation ranges with momentum 0.1
  # (train_frac.py:113), not the 0.9 of the PFQ and DFQ scripts.
  config.quant.act_momentum = 0.1
  # SPEC section 6's normalization, also when the images come from a folder copy
  # (--config.data.dataset=folder:PATH, whose own statistics would be measured).
  config.data.normalization = "cifar10"
  return config
