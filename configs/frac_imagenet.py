"""FracTrain (SPEC sections 5, 6) on ImageNet: ResNet-18, target steering cp 3 -> 4.5%.

With 6-bit weights and the ImageNet candidates the steering cp can reach
2.344-8.854 %.

90 epochs at batch 256, lr 0.1 x0.1 every 30 epochs, counted in iterations:
one epoch is the 5,005 batches of 256 that cover the 1,281,167 training images
(the last one partial in PyTorch's loader, which the authors used).

Run: ``python main.py --config configs/frac_imagenet.py --workdir /tmp/frac_in``
with ``--config.data.data_dir=/path/to/tensorflow_datasets``; ResNet-34:
``--config.model.name=resnet34``.
"""

import ml_collections

from configs import default

TRAIN_IMAGES = 1_281_167
BATCH_SIZE = 256
# Ceiling: the authors' PyTorch loader keeps the last, partial batch.
STEPS_PER_EPOCH = -(-TRAIN_IMAGES // BATCH_SIZE)
EPOCHS = 90


def get_config() -> ml_collections.ConfigDict:
  """FracTrain gated ResNet-18 on ImageNet (imagenet2012)."""
  config = default.get_config()
  # DFQ gate with a target raised at PFQ's turning points.
  config.method = "frac"
  # ImageNet backbone of the paper's table.
  config.model.name = "resnet18"
  # TFDS ImageNet (must be prepared by hand: manual download).
  config.data.dataset = "imagenet2012"
  # Standard ImageNet batch.
  config.train.batch_size = BATCH_SIZE
  # 90 epochs.
  config.train.iters = EPOCHS * STEPS_PER_EPOCH
  # Evaluate (and feed the indicator) once per epoch.
  config.train.eval_every = STEPS_PER_EPOCH
  # 50,000 validation images = 100 batches.
  config.train.eval_batch_size = 500
  # lr x0.1 after 30 and 60 epochs.
  config.optim.boundaries = (30 * STEPS_PER_EPOCH, 60 * STEPS_PER_EPOCH)
  # Weight bits of the gated convs (README: --weight_bits 6).
  config.dfq.weight_bits = 6
  # Forward bits of the 4 ImageNet candidates.
  config.dfq.fw_candidates = (3, 4, 6, 8)
  # Backward bits of the 4 ImageNet candidates.
  config.dfq.bw_candidates = (6, 8, 12, 16)
  # First target steering cp in % (README: --target_ratio 3).
  config.dfq.target_cp = 3.0
  # Raise per turning point (README: --target_ratio_step 0.5).
  config.dfq.target_step = 0.5
  # Indicator threshold epsilon (README: --initial_threshold 0.05).
  config.pfq.eps = 0.05
  # Threshold decay alpha (README: --decay 0.3).
  config.pfq.alpha = 0.3
  # Three raises: targets 3.0, 3.5, 4.0, 4.5.
  config.pfq.num_turning_points = 3
  # The FracTrain scripts keep running activation ranges with momentum 0.1
  # (train_frac.py:113).
  config.quant.act_momentum = 0.1
  return config
