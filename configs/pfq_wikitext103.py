"""PFQ Transformer LM on WikiText-103: forward 4->6->8 bits, backward 6->8->8.

The recipe of ``fp32_wikitext103.py``; the loss-plateau indicator (Alg. 1,
eps 0.05, alpha 0.3) raises the precision of every QDense at each turning
point. The CNNs' first stage (3/6 bits) is one step lower; we start the LM
at 4/6, a choice not tested against 3 bits here.

Run: ``python main.py --config configs/pfq_wikitext103.py
--config.data.dataset=text:data/wikitext-103 --workdir /tmp/pfq_wt103``;
at CPU scale on WikiText-2, the flags of ``fp32_wikitext103.py``'s docstring
(they include the indicator's window 3 and scale_epochs 5, so that turning
points fall inside 400 iterations) with ``--workdir /tmp/lm/pfq``.
"""

import ml_collections

from configs import fp32_wikitext103


def get_config() -> ml_collections.ConfigDict:
  """PFQ Transformer LM on WikiText-103 with a 3-stage schedule."""
  config = fp32_wikitext103.get_config()
  # Progressive precision driven by the loss-plateau indicator.
  config.method = "pfq"
  # Forward (activation and weight) bits of the 3 stages.
  config.pfq.fw_schedule = (4, 6, 8)
  # Backward (output gradient) bits of the 3 stages.
  config.pfq.bw_schedule = (6, 8, 8)
  # Stages - 1.
  config.pfq.num_turning_points = 2
  # Initial threshold epsilon, as on CIFAR.
  config.pfq.eps = 0.05
  # Threshold decay alpha, as on CIFAR.
  config.pfq.alpha = 0.3
  return config
