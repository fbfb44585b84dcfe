#!/usr/bin/env bash
# The CPU-scale Transformer LM study of docs/RESULTS.md: FP32, SBM 8/8, PFQ, DFQ and
# FracTrain on the same model, data, seed and iteration budget, on the shipped WikiText-2 text
# (trained on its validation split, tested on its test split: not the standard
# protocol), then each final checkpoint evaluated on the whole test split, then
# the report. About half an hour on a 2-core machine with the defaults.
#
# Usage: scripts/cpu_study_lm.sh DATA_DIR [OUT_ROOT]
#   DATA_DIR  the extracted WikiText-2 folder (valid.txt, test.txt), e.g. after
#             `tar xzf ../shared/data/wikitext-2-valid-test.tar.gz -C /tmp` use /tmp/wikitext-2
#   OUT_ROOT  where the workdirs and the report go (default: runs/cpu_study_lm)
# Environment: ITERS (400), EVAL_EVERY (20), TEST_SUBSET (16384 tokens for the
#   evaluations during training), METHODS ("fp32 sbm pfq dfq frac"), PYTHON (python3).
#   Each entry names configs/<entry>_wikitext103.py.
set -euo pipefail

[[ $# -ge 1 && -f $1/valid.txt && -f $1/test.txt ]] || {
  echo "usage: $0 DATA_DIR [OUT_ROOT]  (DATA_DIR must hold valid.txt and test.txt)" >&2; exit 2; }
DATA_DIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
OUT=${2:-runs/cpu_study_lm}
PY=${PYTHON:-python3}
ITERS=${ITERS:-400}
EVAL_EVERY=${EVAL_EVERY:-20}
TEST_SUBSET=${TEST_SUBSET:-16384}
METHODS=${METHODS:-fp32 sbm pfq dfq frac}
# A 2-block, 128-wide model with a 64-token context, AdamW at 1e-3 (cosine, 20
# warm-up steps); the PFQ indicator's window 3 and scale 5 epochs, so that its
# turning points fall inside the budget.
FLAGS=(--config.data.dataset="text:$DATA_DIR" --config.data.text_train=valid
  --config.data.text_test=test --config.model.lm.depth=2 --config.model.lm.width=128
  --config.model.lm.heads=4 --config.model.lm.context=64 --config.model.lm.dropout=0.0
  --config.train.batch_size=32 --config.train.iters="$ITERS"
  --config.train.eval_every="$EVAL_EVERY" --config.train.eval_batch_size=32
  --config.optim.lr=1e-3 --config.optim.warmup_iters=20 --config.optim.warmup_lr=1e-4
  --config.pfq.window=3 --config.pfq.scale_epochs=5)
mkdir -p "$OUT"

for m in $METHODS; do
  echo "=== $m ($(date -u +%H:%M:%S))"
  "$PY" main.py --config "configs/${m}_wikitext103.py" --workdir "$OUT/$m" "${FLAGS[@]}" \
    --config.data.test_subset="$TEST_SUBSET" 2>&1 | grep -v -e WARNING -e '^I0000' | tail -n 3
done
for m in $METHODS; do
  echo "=== $m, whole test split"
  "$PY" main.py --config "configs/${m}_wikitext103.py" --workdir "$OUT/$m" "${FLAGS[@]}" \
    --config.data.test_subset=0 --eval_only 2>&1 | tail -n 1
done
"$PY" -m fractrain_jax.report $(for m in $METHODS; do echo "$OUT/$m"; done) --out "$OUT/report"
