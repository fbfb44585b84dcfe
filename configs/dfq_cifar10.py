"""DFQ (SPEC section 4) on CIFAR-10: a per-sample, per-block gate at target steering cp 3%.

Trains gated_<model.name>: weights at 4 bits, each block picks one of the
candidate pairs (3,6) (4,6) (4,8) (6,8) (6,12) per input. The steering cp (the
gated blocks' cost against FP32, each block weighted 1, as the authors count
it) can reach 1.758-4.688 % with these candidates.

Run: ``python main.py --config configs/dfq_cifar10.py --workdir /tmp/dfq_c10``;
the authors' deterministic gate: ``--config.dfq.gate=hard``.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """DFQ gated ResNet-38 on CIFAR-10, target cp 3%."""
  config = default.get_config()
  # Input-adaptive precision chosen by the LSTM gate.
  config.method = "dfq"
  # Weight bits of the gated convs (README: --weight_bits 4).
  config.dfq.weight_bits = 4
  # Forward bits of the 5 CIFAR candidates.
  config.dfq.fw_candidates = (3, 4, 4, 6, 6)
  # Backward bits of the 5 CIFAR candidates.
  config.dfq.bw_candidates = (6, 6, 8, 8, 12)
  # Target steering cp in % (README: --target_ratio 3).
  config.dfq.target_cp = 3.0
  # SPEC section 6's normalization, also when the images come from a folder copy
  # (--config.data.dataset=folder:PATH, whose own statistics would be measured).
  config.data.normalization = "cifar10"
  return config
