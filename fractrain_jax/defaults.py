"""Every configuration key, with its default: the paper's CIFAR recipe (SPEC section 6).

Full-precision ResNet-38 on CIFAR-10: SGD with momentum 0.9, weight decay 1e-4,
lr 0.1, batch 128, 64,000 iterations with lr x0.1 at 32,000 and 48,000. The
library's schema: ``config_check`` accepts exactly these keys, the benchmark
builds its configs from here, and every recipe in ``configs/`` starts from it
(``configs/default.py`` is this recipe). ``unknown_key`` finds a key the
schema lacks (a ConfigDict takes a misspelt one silently) and
``unknown_key_error`` refuses it in one line naming the nearest key.
"""

import difflib

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration: FP32 ResNet-38 on CIFAR-10."""
  config = ml_collections.ConfigDict()

  # Training method: 'fp32' (full precision), 'static' (fixed fw/bw bits,
  # e.g. SBM 8/8), 'pfq' (SPEC section 3), 'dfq' (section 4) or 'frac'
  # (FracTrain, section 5).
  config.method = "fp32"
  # Seed of parameter init, data order, Gumbel noise and stochastic rounding.
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  # Backbone: resnet20/38/74/110/152 or mobilenet_v2 (CIFAR), resnet18/34/50
  # (ImageNet). 'dfq' and 'frac' train its gated_<name> variant.
  config.model.name = "resnet38"
  # A model of your own instead: model.name='package.module:factory' (importable from
  # the working directory or PYTHONPATH), called as factory(num_classes=...,
  # rngs=..., **options); the task follows the data (images: classification,
  # text:PATH: next-token logits of model.lm.context tokens). The keyword
  # options of the factory (a model of the zoo takes none).
  config.model.options = ml_collections.ConfigDict()
  # Gated blocks of a model of your own, for 'dfq' and 'frac': regexes that
  # match the module paths in full, e.g. (r'blocks/\d+',) or
  # (r'layers/\d+/(attn|mlp)',); the gate decides before each one runs.
  config.model.blocks = ()
  # Which layers of a model of your own are quantized: ordered rules
  # 'q:REGEX' (quantized), 'fp:REGEX' (full precision) or 'A/G[/W]:REGEX'
  # (held at those bits), first match wins, an unmatched layer full precision;
  # () = every nnx.Conv/Linear/Einsum quantized but the first layer (image
  # models) and the last one called.
  config.model.quantize = ()
  # The Transformer LM's shape (model.name='transformer_lm'; the CNNs ignore it).
  config.model.lm = ml_collections.ConfigDict()
  # Number of pre-LayerNorm blocks.
  config.model.lm.depth = 2
  # Embedding and residual width.
  config.model.lm.width = 128
  # Attention heads (must divide width).
  config.model.lm.heads = 4
  # MLP hidden width = mlp_ratio * width.
  config.model.lm.mlp_ratio = 4
  # Tokens per training window (and per evaluation window).
  config.model.lm.context = 64
  # Dropout rate on embeddings, attention weights and residual branches.
  config.model.lm.dropout = 0.0
  # Position encoding: 'learned' or 'sinusoidal'.
  config.model.lm.positions = "learned"
  # Output layer shares the input embedding matrix.
  config.model.lm.tied = True

  config.data = ml_collections.ConfigDict()
  # 'cifar10', 'cifar100', 'imagenet2012' (TFDS), 'folder:PATH' (a directory
  # with train/<class>/*.jpg and test/<class>/*.jpg) or, for transformer_lm,
  # 'text:PATH' (wiki.{train,valid,test}.tokens or {train,valid,test}.txt).
  config.data.dataset = "cifar10"
  # text:PATH only: the split that trains and gives the vocabulary ('train',
  # 'valid' or 'test').
  config.data.text_train = "train"
  # text:PATH only: the split that is evaluated.
  config.data.text_test = "test"
  # TFDS data_dir; None uses the TFDS default (~/tensorflow_datasets).
  config.data.data_dir = config_dict.placeholder(str)
  # Use only N training examples; 0 = all (quick runs and tests). For
  # text:PATH, the first N tokens.
  config.data.train_subset = 0
  # Use only N test examples; 0 = all. For text:PATH, the first N tokens (cheap
  # evaluations during training; evaluate the whole split with main.py --eval_only).
  config.data.test_subset = 0
  # Side of the random-resized train crops and eval center crops of the streamed
  # ImageNet pipeline; in-memory (CIFAR-sized) data keeps its stored size.
  config.data.image_size = 224
  # Let TFDS download (with progress) and prepare cifar10 / cifar100 once under
  # data_dir when they are not there; offline this fails in one line within
  # seconds. imagenet2012 cannot be downloaded by TFDS: its manual files are
  # named instead. False fails fast when the dataset is not prepared.
  config.data.download = True
  # Per-channel normalization of the images: 'auto' (the data source's own:
  # SPEC section 6's CIFAR-10 figures for cifar10 and cifar100, as the paper,
  # ImageNet's published figures for imagenet2012, and for folder:PATH the
  # mean and standard deviation measured on its training split), 'cifar10'
  # (SPEC section 6's figures whatever the data: the paper's recipe on a folder
  # copy of CIFAR-10), 'imagenet' (the published ImageNet figures) or
  # 'measured' (measured on the training split of in-memory data).
  config.data.normalization = "auto"

  config.train = ml_collections.ConfigDict()
  # Number of SGD iterations (64,000 in the paper's CIFAR recipe).
  config.train.iters = 64000
  # Global batch size (split across devices).
  config.train.batch_size = 128
  # Evaluate every N iterations; also the length of the PFQ indicator's
  # "epoch" (390 iterations = one CIFAR epoch at batch 128).
  config.train.eval_every = 390
  # Global batch size at evaluation (10,000 CIFAR test images = 20 batches).
  config.train.eval_batch_size = 500
  # Full-precision fine-tuning iterations after the last one; 0 = none.
  config.train.finetune_iters = 0
  # Devices of the 1-D data mesh the batch is split over; 0 = all visible.
  config.train.num_devices = 0
  # Weight gradients of the convs that run XLA's kernels (train.kernels below) in the
  # train step: -1 (auto: summed over chunks of 8 samples on a one-device CPU mesh for
  # convs with at most 16 input features, faster there; XLA's form elsewhere), 0 (XLA's
  # one conv over the whole batch: earlier versions' numerics bit for bit) or n samples
  # per chunk for every conv. Same gradient, another summation order (fractrain_jax/conv.py).
  config.train.conv_weight_grad_split = -1
  # Kernels of the convs and BatchNorms in the train and eval steps: "auto" (oneDNN's
  # through JAX's FFI on a one-device CPU mesh where they build, faster there; XLA's
  # elsewhere), "xla" (XLA's: earlier versions' numerics) or "onednn" (an error where
  # they cannot run). Same ops, another summation order (fractrain_jax/kernels.py).
  config.train.kernels = "auto"
  # Refresh the progress bar (and log the training loss) every N iterations.
  config.train.log_every = 50

  config.optim = ml_collections.ConfigDict()
  # 'sgd' (PyTorch SGD, the paper's CIFAR recipe) or 'adamw' (the Transformer
  # LM's recipes; momentum is its beta1, weight decay decoupled).
  config.optim.name = "sgd"
  # Peak learning rate of SGD.
  config.optim.lr = 0.1
  # SGD momentum (PyTorch convention: buf = m * buf + grad).
  config.optim.momentum = 0.9
  # Coupled L2 weight decay on all parameters, as PyTorch's SGD applies it.
  config.optim.weight_decay = 1e-4
  # Learning-rate schedule: 'piecewise' (x decay at each boundary), 'cosine'
  # or 'linear' (both down to 0 at the last iteration).
  config.optim.schedule = "piecewise"
  # Iterations at which the piecewise schedule multiplies the lr by decay.
  config.optim.boundaries = (32000, 48000)
  # Factor applied at each piecewise boundary.
  config.optim.decay = 0.1
  # Constant warm-up iterations at warmup_lr before the schedule; 0 = none
  # (the paper's optional warm-up is 400 iterations at 0.01).
  config.optim.warmup_iters = 0
  # Learning rate during the warm-up.
  config.optim.warmup_lr = 0.01

  config.quant = ml_collections.ConfigDict()
  # Forward (activation) bits of method 'static'; weights use the same width.
  config.quant.fw_bits = 8
  # Backward (gradient) bits of method 'static'.
  config.quant.bw_bits = 8
  # Momentum of the running activation range used at evaluation (0.9 in the
  # authors' PFQ and DFQ scripts; their FracTrain script uses 0.1).
  config.quant.act_momentum = 0.9

  config.pfq = ml_collections.ConfigDict()
  # Forward bits of each PFQ stage (README example: 3, 4, 6, 8).
  config.pfq.fw_schedule = (3, 4, 6, 8)
  # Backward bits of each PFQ stage.
  config.pfq.bw_schedule = (6, 6, 8, 8)
  # Initial turning-point threshold epsilon of Alg. 1 (--initial_threshold).
  config.pfq.eps = 0.05
  # Threshold decay alpha, applied after the first and second turning points.
  config.pfq.alpha = 0.3
  # Number of turning points (PFQ: stages - 1; FracTrain: target raises).
  config.pfq.num_turning_points = 3
  # Number of recent epoch losses compared by the indicator.
  config.pfq.window = 5
  # The loss scale is the mean loss of the first this many epochs.
  config.pfq.scale_epochs = 10

  config.dfq = ml_collections.ConfigDict()
  # Fixed weight bits of the gated convs (4 on CIFAR, 6 on ImageNet).
  config.dfq.weight_bits = 4
  # Forward bits of the K candidates the gate chooses from.
  config.dfq.fw_candidates = (3, 4, 4, 6, 6)
  # Backward bits of the K candidates (paired with fw_candidates).
  config.dfq.bw_candidates = (6, 6, 8, 8, 12)
  # Target steering cp (%: the gated blocks' cost against FP32, see
  # cost_weighting) of 'dfq'; first target of 'frac'.
  config.dfq.target_cp = 3.0
  # Target raise per turning point of 'frac' (target_i = target_cp + i*step).
  config.dfq.target_step = 0.5
  # Weight beta of the cost loss sign * beta * (the batch's total gated cost),
  # as in the authors' scripts (train_frac.py:432).
  config.dfq.beta = 1e-3
  # Half-width of the 'dfq' band around the target with sign +-0.1; 0 = none.
  config.dfq.relax = 0.0
  # Width of the 'frac' band above the target with sign 0; 0 = none.
  config.dfq.range = 0.0
  # Training gate: 'gumbel' (straight-through Gumbel-softmax) or 'hard'
  # (the authors' straight-through argmax of the softmax).
  config.dfq.gate = "gumbel"
  # Gumbel-softmax temperature at the first iteration; it sets only the
  # gradient's sharpness, the forward choice is one-hot whatever tau.
  config.dfq.tau_start = 1.0
  # Temperature at the last iteration (exponential annealing in between).
  config.dfq.tau_end = 0.5
  # Weight of each gated block in the steering cp and the cost loss: 'blocks'
  # (every block 1, the authors' default) or 'macs' (the block's real MACs,
  # their --conv_info FLOPs table, used for MobileNetV2). The full-precision
  # layers are never in it; whole-model cost is reported separately.
  config.dfq.cost_weighting = "blocks"
  # How a gated block runs: 'single' (one pass, the K candidate quantizations
  # of each conv input blended by the mask; shortcuts full precision) or
  # 'per_candidate' (the authors' CIFAR code: the block runs once per
  # candidate, shortcut quantized at its bits, outputs blended by the mask;
  # K times the compute). Same parameters, gate and cost accounting.
  config.dfq.forward = "single"
  # Gate head: 'cifar' (pool, 1x1 conv to 32, ReLU, 1x1 conv to 16; LSTM 16),
  # 'imagenet' (pool, 1x1 conv to 40; LSTM 20), 'mobilenet' (as 'cifar' at
  # 64 and 32; LSTM 32), or 'auto': the authors' head for the model
  # ('mobilenet' for mobilenet_v2, else 'cifar' at 32x32, 'imagenet' at 224x224).
  config.dfq.gate_head = "auto"
  # Gate initialization: 'default' (zero biases, nnx's LSTM init) or 'authors'
  # (PyTorch's defaults, as their code leaves them: uniform biases and LSTM).
  config.dfq.gate_init = "default"

  config.checkpoint = ml_collections.ConfigDict()
  # Number of most recent checkpoints kept in the workdir.
  config.checkpoint.keep = 3

  return config


# Sections whose keys are the user's, not the schema's: a factory's keyword options.
FREE_FORM = ("model.options",)


def keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every key of ``config``, dotted, sections included (``train``, ``train.iters``);
  the keys inside a ``FREE_FORM`` section are not the schema's and are left out."""
  found = []
  for key, value in config.items():
    found.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict) and prefix + key not in FREE_FORM:
      found += keys(value, f"{prefix}{key}.")
  return found


def unknown_key(config: ml_collections.ConfigDict) -> str | None:
  """The first key of ``config`` that this schema lacks (a typo a ConfigDict accepts
  silently); None when every key is known."""
  known = set(keys(get_config()))
  return next((key for key in keys(config) if key not in known), None)


def _initials(name: str) -> str:
  return "".join(word[0] for word in name.split("_") if word)


def nearest_key(key: str) -> str | None:
  """The schema's key nearest to ``key``: one of its section whose name is the initials of
  ``key``'s (``learning_rate``: ``lr``) or the other way round, else the closest spelling."""
  known = keys(get_config())
  section, _, name = key.rpartition(".")
  for candidate in known:
    other_section, _, other = candidate.rpartition(".")
    if other_section == section and len(other) > 1 and len(name) > 1 and (
        other == _initials(name) or name == _initials(other)):
      return candidate
  near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
  return near[0] if near else None


def unknown_key_error(key: str, where: str = "") -> str:
  """One line refusing ``key`` (``where``: how it was given), naming the nearest known key."""
  near = nearest_key(key)
  hint = (f"; did you mean config.{near}?" if near
          else "; the keys are in fractrain_jax/defaults.py")
  return f"unknown config key config.{key}{f' ({where})' if where else ''}{hint}"
