"""SBM baseline (Banner et al. 2018) on CIFAR-100: static 8-bit forward, 8-bit backward.

Run: ``python main.py --config configs/sbm_cifar100.py --workdir /tmp/sbm_c100``;
the paper's ResNet-74 row: ``--config.model.name=resnet74``.
"""

import ml_collections

from configs import sbm_cifar10


def get_config() -> ml_collections.ConfigDict:
  """Static 8/8-bit ResNet-38 on CIFAR-100 (SPEC section 7 baseline)."""
  config = sbm_cifar10.get_config()
  # 100 classes; same images, same recipe as CIFAR-10.
  config.data.dataset = "cifar100"
  return config
