"""SBM (static 8-bit forward, 8-bit backward) Transformer LM on WikiText-103.

The recipe of ``fp32_wikitext103.py`` with every QDense (Q, K, V, output
projections, MLP) at 8/8 bits; embeddings, LayerNorms, softmax, attention
products and the tied output layer stay full precision.

Run: ``python main.py --config configs/sbm_wikitext103.py
--config.data.dataset=text:data/wikitext-103 --workdir /tmp/sbm_wt103``;
at CPU scale on WikiText-2, the flags of ``fp32_wikitext103.py``'s docstring
with ``--workdir /tmp/lm/sbm``.
"""

import ml_collections

from configs import fp32_wikitext103


def get_config() -> ml_collections.ConfigDict:
  """Static 8/8-bit Transformer LM on WikiText-103."""
  config = fp32_wikitext103.get_config()
  # One precision for the whole run, compiled once.
  config.method = "static"
  # 8-bit activations and weights in the forward pass.
  config.quant.fw_bits = 8
  # 8-bit output gradients in the backward pass.
  config.quant.bw_bits = 8
  return config
