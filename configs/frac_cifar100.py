"""FracTrain (SPEC section 5) on CIFAR-100: DFQ whose target cp rises 1.5 -> 3.0%.

PFQ's turning-point indicator raises the DFQ target by 0.5 at each of its 3
turning points: 1.5, 2.0, 2.5, 3.0 % of the FP32 step cost.

Run: ``python main.py --config configs/frac_cifar100.py --workdir /tmp/frac_c100``;
the README's ResNet-74 example: ``--config.model.name=resnet74``.
"""

import ml_collections

from configs import frac_cifar10


def get_config() -> ml_collections.ConfigDict:
  """FracTrain gated ResNet-38 on CIFAR-100."""
  config = frac_cifar10.get_config()
  # 100 classes; same images, same recipe as CIFAR-10.
  config.data.dataset = "cifar100"
  return config
