"""Full-precision (FP32) baseline on CIFAR-10: the paper's recipe as it stands.

Run: ``python main.py --config configs/fp32_cifar10.py --workdir /tmp/fp32_c10``;
a deeper model: ``--config.model.name=resnet74``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """FP32 ResNet-38 on CIFAR-10, 64,000 iterations."""
  config = default.get_config()
  # Full precision everywhere: the accuracy every low-precision run is compared to.
  config.method = "fp32"
  # SPEC section 6's normalization, also when the images come from a folder copy
  # (--config.data.dataset=folder:PATH, whose own statistics would be measured).
  config.data.normalization = "cifar10"
  return config
