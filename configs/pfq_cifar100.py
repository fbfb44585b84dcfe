"""PFQ (SPEC section 3) on CIFAR-100: forward 3->4->6->8 bits, backward 6->6->8->8.

The turning-point indicator (Alg. 1, eps 0.05, alpha 0.3) moves training to
the next stage; the step recompiles only there.

Run: ``python main.py --config configs/pfq_cifar100.py --workdir /tmp/pfq_c100``;
the README's ResNet-74 example:
``--config.model.name=resnet74``.
"""

import ml_collections

from configs import pfq_cifar10


def get_config() -> ml_collections.ConfigDict:
  """PFQ ResNet-38 on CIFAR-100 with the README's 4-stage schedule."""
  config = pfq_cifar10.get_config()
  # 100 classes; same images, same recipe as CIFAR-10.
  config.data.dataset = "cifar100"
  return config
