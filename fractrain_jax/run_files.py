"""What a training run leaves in its workdir: file names and the metrics schema.

Shared by the writer (train.py) and the readers (report.py, tests), and free
of JAX, so a report runs wherever the files can be copied to.
"""

from __future__ import annotations

CONFIG = "config.json"          # The run's config, as JSON.
METRICS = "metrics.jsonl"       # One JSON object per evaluation, keys below.
SUMMARY = "summary.json"        # Written once the last iteration is done.
CHECKPOINTS = "checkpoints"     # Orbax checkpoints: arrays, plus the run's bookkeeping.
TENSORBOARD = "tensorboard"     # The numeric metrics as TensorBoard scalars.
LOG = "log.txt"                 # A copy of the run's console lines.

# Keys of a metrics.jsonl line. Per-interval values are means over the
# iterations since the previous line; "cost*" are cumulative since step 0.
METRIC_KEYS = {
    "step": "iterations done",
    "epoch": "step / train.eval_every (the PFQ indicator's epochs)",
    "phase": "'train' or 'finetune' (full precision after train.iters)",
    "lr": "learning rate, interval mean",
    "train_loss": "cross-entropy (the LM: mean over tokens), interval mean",
    "train_cost_term": "DFQ's signed cost term sign * beta * cost, interval mean (0 for plain runs)",
    "train_acc": "training accuracy (%), interval mean (the LM: token accuracy)",
    "test_loss": "test cross-entropy at this step",
    "test_acc": "test accuracy (%) at this step (the LM: share of test tokens predicted right)",
    "test_ppl": "the LM only: test perplexity, exp(test_loss) over every test token",
    "stage": "PFQ stage / FracTrain target index in force during the interval",
    "fw_bits": "forward bits of a plain quantized run (None otherwise)",
    "bw_bits": "backward bits of a plain quantized run (None otherwise)",
    "target_cp": "DFQ/FracTrain target steering cp (%) (None otherwise)",
    "steer_cp": "steering cp (%): gated blocks only, the authors' accounting, interval mean",
    "model_cp": "whole-model cp (%): every layer at its real MACs, interval mean",
    "cost": "cumulative whole-model cost, bit-scaled MACs (FW + EB + GC)",
    "cost_fw": "cumulative forward part of cost",
    "cost_eb": "cumulative error-backprop part of cost",
    "cost_gc": "cumulative weight-gradient part of cost",
    "cost_paper": "cumulative cost in the paper's convention: steering cp (plain runs: the "
                  "quantized layers' cp) x FP32 cost",
    "cost_quantized": "cumulative cost of the layers the method quantizes, alone",
    "choice_ratio": "gated runs: per block, the share of each candidate over the interval",
    "candidates": "gated runs: [fw candidates, bw candidates]",
    "wall_s": "training wall time so far, seconds",
    "method": "the run's method",
    "model": "the run's model",
}
