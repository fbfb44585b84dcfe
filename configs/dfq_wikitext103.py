"""DFQ Transformer LM on WikiText-103: a per-token, per-sublayer gate at target steering cp 4.8%.

The recipe of ``fp32_wikitext103.py`` training ``gated_transformer_lm``:
before each attention and each MLP sublayer, the gate reads every token's
residual-stream state and picks one of the candidates (4/6), (6/8), (8/8)
for that token (weights at 8 bits). The steering cp (the sublayers' cost
against FP32, each weighted 1, averaged over tokens) can reach
3.385-6.250 % with these candidates; 4.8 is the middle of that range (SBM
8/8 is 6.25).

Run: ``python main.py --config configs/dfq_wikitext103.py
--config.data.dataset=text:data/wikitext-103 --workdir /tmp/dfq_wt103``;
at CPU scale on WikiText-2, the flags of ``fp32_wikitext103.py``'s docstring
with ``--workdir /tmp/lm/dfq``.
"""

import ml_collections

from configs import fp32_wikitext103


def get_config() -> ml_collections.ConfigDict:
  """DFQ gated Transformer LM on WikiText-103, target steering cp 4.8%."""
  config = fp32_wikitext103.get_config()
  # Input-adaptive precision, chosen per token by the LSTM gate.
  config.method = "dfq"
  # Target steering cp in %: the middle of the candidates' 3.385-6.250 % range.
  config.dfq.target_cp = 4.8
  return config
