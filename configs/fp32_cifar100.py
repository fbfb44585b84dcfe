"""Full-precision (FP32) baseline on CIFAR-100.

Run: ``python main.py --config configs/fp32_cifar100.py --workdir /tmp/fp32_c100``;
a deeper model: ``--config.model.name=resnet74``.
"""

import ml_collections

from configs import fp32_cifar10


def get_config() -> ml_collections.ConfigDict:
  """FP32 ResNet-38 on CIFAR-100, 64,000 iterations."""
  config = fp32_cifar10.get_config()
  # 100 classes; same images, same recipe as CIFAR-10.
  config.data.dataset = "cifar100"
  return config
