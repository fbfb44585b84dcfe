"""DFQ (SPEC section 4) on CIFAR-100: a per-sample, per-block gate at target cp 3%.

Trains gated_<model.name>: weights at 4 bits, each block picks one of the
candidate pairs (3,6) (4,6) (4,8) (6,8) (6,12) per input.

Run: ``python main.py --config configs/dfq_cifar100.py --workdir /tmp/dfq_c100``;
the README's ResNet-74 example: ``--config.model.name=resnet74``.
"""

import ml_collections

from configs import dfq_cifar10


def get_config() -> ml_collections.ConfigDict:
  """DFQ gated ResNet-38 on CIFAR-100, target cp 3%."""
  config = dfq_cifar10.get_config()
  # 100 classes; same images, same recipe as CIFAR-10.
  config.data.dataset = "cifar100"
  return config
