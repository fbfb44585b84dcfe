"""DFQ (SPEC section 4) on CIFAR-100: a per-sample, per-block gate at target cp 3%.

Trains gated_<model.name>: weights at 4 bits, each block picks one of the
candidate pairs (3,6) (4,6) (4,8) (6,8) (6,12) per input.

Run: ``python main.py --config configs/dfq_cifar100.py --workdir /tmp/dfq_c100``;
the README's ResNet-74 example: ``--config.model.name=resnet74``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """DFQ gated ResNet-38 on CIFAR-100, target cp 3%."""
  config = default.get_config()
  # 100 classes; same images, same recipe as CIFAR-10.
  config.data.dataset = "cifar100"
  # Input-adaptive precision chosen by the LSTM gate.
  config.method = "dfq"
  # Weight bits of the gated convs (README: --weight_bits 4).
  config.dfq.weight_bits = 4
  # Forward bits of the 5 CIFAR candidates.
  config.dfq.fw_candidates = (3, 4, 4, 6, 6)
  # Backward bits of the 5 CIFAR candidates.
  config.dfq.bw_candidates = (6, 6, 8, 8, 12)
  # Target cp in % of the FP32 step cost (README: --target_ratio 3).
  config.dfq.target_cp = 3.0
  return config
