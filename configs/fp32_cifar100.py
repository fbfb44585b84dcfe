"""Full-precision (FP32) baseline on CIFAR-100.

Run: ``python main.py --config configs/fp32_cifar100.py --workdir /tmp/fp32_c100``;
a deeper model: ``--config.model.name=resnet74``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """FP32 ResNet-38 on CIFAR-100, 64,000 iterations."""
  config = default.get_config()
  # Full precision everywhere: the accuracy every low-precision run is compared to.
  config.method = "fp32"
  # 100 classes; same images, same recipe as CIFAR-10.
  config.data.dataset = "cifar100"
  return config
