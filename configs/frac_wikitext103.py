"""FracTrain Transformer LM on WikiText-103: DFQ's per-token gate, target cp 3.6 -> 4.8%.

The recipe of ``dfq_wikitext103.py`` (``gated_transformer_lm``, candidates
(4/6), (6/8), (8/8) with 8-bit weights, steering cp 3.385-6.250 %), with
PFQ's turning-point indicator raising the target by 0.6 at each of its 2
turning points: 3.6, 4.2, 4.8 %. As on CIFAR, the last target is DFQ's, so
FracTrain spends less on average; the two turning points are the PFQ LM
recipe's.

Run: ``python main.py --config configs/frac_wikitext103.py
--config.data.dataset=text:data/wikitext-103 --workdir /tmp/frac_wt103``;
at CPU scale on WikiText-2, the flags of ``fp32_wikitext103.py``'s docstring
(they include the indicator's window 3 and scale_epochs 5, so that turning
points fall inside 400 iterations) with ``--workdir /tmp/lm/frac``.
"""

import ml_collections

from configs import dfq_wikitext103


def get_config() -> ml_collections.ConfigDict:
  """FracTrain gated Transformer LM on WikiText-103, targets 3.6, 4.2, 4.8%."""
  config = dfq_wikitext103.get_config()
  # DFQ's gate with a target raised at PFQ's turning points.
  config.method = "frac"
  # First target steering cp in %, just above the 3.385 % floor.
  config.dfq.target_cp = 3.6
  # Raise per turning point: 3.6, 4.2, 4.8.
  config.dfq.target_step = 0.6
  # Two raises, as the PFQ LM recipe's two turning points.
  config.pfq.num_turning_points = 2
  # Indicator threshold epsilon, as on CIFAR.
  config.pfq.eps = 0.05
  # Threshold decay alpha, as on CIFAR.
  config.pfq.alpha = 0.3
  return config
