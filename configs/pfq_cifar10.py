"""PFQ (SPEC section 3) on CIFAR-10: forward 3->4->6->8 bits, backward 6->6->8->8.

The turning-point indicator (Alg. 1, eps 0.05, alpha 0.3) moves training to
the next stage; the step recompiles only there.

Run: ``python main.py --config configs/pfq_cifar10.py --workdir /tmp/pfq_c10``;
the paper's wider backward schedule:
``--config.pfq.bw_schedule='(6,8,12,16)'``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """PFQ ResNet-38 on CIFAR-10 with the README's 4-stage schedule."""
  config = default.get_config()
  # Progressive precision driven by the loss-plateau indicator.
  config.method = "pfq"
  # Forward (activation and weight) bits of the 4 stages.
  config.pfq.fw_schedule = (3, 4, 6, 8)
  # Backward (gradient) bits of the 4 stages.
  config.pfq.bw_schedule = (6, 6, 8, 8)
  # Initial threshold epsilon (README: --initial_threshold 0.05).
  config.pfq.eps = 0.05
  # Threshold decay alpha (README: --decay 0.3).
  config.pfq.alpha = 0.3
  # Stages - 1.
  config.pfq.num_turning_points = 3
  # The indicator's epoch: the PFQ script feeds it every 400 iterations
  # (train_pfq.py:73); evaluation runs at the same points.
  config.train.eval_every = 400
  # SPEC section 6's normalization, also when the images come from a folder copy
  # (--config.data.dataset=folder:PATH, whose own statistics would be measured).
  config.data.normalization = "cifar10"
  return config
