"""SBM baseline (Banner et al. 2018) on CIFAR-10: static 8-bit forward, 8-bit backward.

Run: ``python main.py --config configs/sbm_cifar10.py --workdir /tmp/sbm_c10``;
the paper's ResNet-74 row: ``--config.model.name=resnet74``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Static 8/8-bit ResNet-38 on CIFAR-10 (SPEC section 7 baseline)."""
  config = default.get_config()
  # One precision for the whole run, compiled once.
  config.method = "static"
  # SBM: 8-bit activations and weights in the forward pass.
  config.quant.fw_bits = 8
  # SBM: 8-bit gradients in the backward pass.
  config.quant.bw_bits = 8
  # SPEC section 6's normalization, also when the images come from a folder copy
  # (--config.data.dataset=folder:PATH, whose own statistics would be measured).
  config.data.normalization = "cifar10"
  return config
