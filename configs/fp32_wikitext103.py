"""Full-precision Transformer LM on WikiText-103 (issue 14; our recipe, not the paper's).

Every LM recipe starts from this one (``sbm_wikitext103.py``,
``pfq_wikitext103.py``, ``dfq_wikitext103.py``, ``frac_wikitext103.py``), so
it also holds the gated LM's candidates. The size and schedule below are a starting point
for a GPU and have not been run here; docs/RESULTS.md holds the CPU-scale
runs.

Run: ``python main.py --config configs/fp32_wikitext103.py
--config.data.dataset=text:data/wikitext-103 --workdir /tmp/fp32_wt103``.

CPU scale, on the shipped WikiText-2 text (trains on its validation split
and tests on its test split, which is not the standard protocol; extract it
first with ``tar xzf ../shared/data/wikitext-2-valid-test.tar.gz -C data``):

  python main.py --config configs/fp32_wikitext103.py \\
      --config.data.dataset=text:data/wikitext-2 --config.data.text_train=valid \\
      --config.data.text_test=test --config.data.test_subset=16384 \\
      --config.model.lm.depth=2 --config.model.lm.width=128 --config.model.lm.heads=4 \\
      --config.model.lm.context=64 --config.model.lm.dropout=0.0 \\
      --config.train.batch_size=32 --config.train.iters=400 --config.train.eval_every=20 \\
      --config.train.eval_batch_size=32 --config.optim.lr=1e-3 \\
      --config.optim.warmup_iters=20 --config.optim.warmup_lr=1e-4 \\
      --config.pfq.window=3 --config.pfq.scale_epochs=5 --workdir /tmp/lm/fp32

then ``python main.py ... --eval_only --config.data.test_subset=0`` with the
same flags for the perplexity of the whole test split.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """FP32 6-block, 512-wide Transformer LM on WikiText-103, AdamW, 100,000 iterations."""
  config = default.get_config()
  # Full precision everywhere: the perplexity every low-precision run is compared to.
  config.method = "fp32"
  # Causal pre-LayerNorm Transformer with quantizable projections and MLPs.
  config.model.name = "transformer_lm"
  # Blocks.
  config.model.lm.depth = 6
  # Residual width.
  config.model.lm.width = 512
  # Heads of 64 features each.
  config.model.lm.heads = 8
  # MLP hidden width 4 x 512.
  config.model.lm.mlp_ratio = 4
  # Tokens per window.
  config.model.lm.context = 256
  # Dropout on embeddings, attention weights and residual branches.
  config.model.lm.dropout = 0.1
  # Learned position embeddings.
  config.model.lm.positions = "learned"
  # Output layer tied to the input embedding (full precision, like a classifier).
  config.model.lm.tied = True
  # WikiText-103 in its released layout (wiki.{train,valid,test}.tokens).
  config.data.dataset = "text:data/wikitext-103"
  # The split that trains and gives the vocabulary.
  config.data.text_train = "train"
  # The split evaluated (whole, test_subset 0).
  config.data.text_test = "test"
  # 100,000 iterations of 64 x 256 tokens: about 16 epochs of 103M tokens.
  config.train.iters = 100000
  # Windows per step.
  config.train.batch_size = 64
  # Evaluation interval, also PFQ's indicator epoch (about 1/6 of a data epoch).
  config.train.eval_every = 1000
  # Windows per evaluation batch.
  config.train.eval_batch_size = 64
  # AdamW: SGD with momentum diverged on the LM (docs/RESULTS.md).
  config.optim.name = "adamw"
  # Peak learning rate.
  config.optim.lr = 5e-4
  # Cosine decay to 0 after the warm-up.
  config.optim.schedule = "cosine"
  # Iterations of constant warm-up at warmup_lr.
  config.optim.warmup_iters = 2000
  # Learning rate during the warm-up.
  config.optim.warmup_lr = 5e-5
  # Decoupled weight decay (AdamW).
  config.optim.weight_decay = 0.01
  # The gated LM's candidates (dfq, frac): PFQ's three LM stages, 4/6, 6/8 and
  # 8/8, chosen per token and sublayer; steering cp 3.385-6.250 %.
  config.dfq.fw_candidates = (4, 6, 8)
  # Backward bits of the candidates (paired with fw_candidates).
  config.dfq.bw_candidates = (6, 8, 8)
  # Weights of the gated matmuls at 8 bits, PFQ's last stage and SBM's.
  config.dfq.weight_bits = 8
  return config
