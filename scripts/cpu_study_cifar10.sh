#!/usr/bin/env bash
# The CPU-scale study of docs/RESULTS.md: FP32, SBM 8/8, PFQ, DFQ and FracTrain on
# the same model, data, seed and iteration budget, on the real CIFAR-10 images,
# then the report. About an hour on a 2-core machine with the defaults.
#
# Usage: scripts/cpu_study_cifar10.sh DATA_DIR [OUT_ROOT]
#   DATA_DIR  the extracted CIFAR-10 folder (holding train/<class>/ and test/<class>/),
#             e.g. after `tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp` use /tmp/cifar10
#   OUT_ROOT  where the five workdirs and the report go (default: runs/cpu_study)
# Environment: MODEL (resnet20), ITERS (1500), EVAL_EVERY (25), TEST_SUBSET (2000),
#   METHODS ("fp32 sbm pfq dfq frac dfq_hard"), PYTHON (python3), BATCH (128),
#   MODEL_FLAGS (more --config flags for every run, split on spaces). Each entry names
#   configs/<entry>_cifar10.py; dfq_hard is DFQ with the authors' argmax gate and
#   dfq_per_candidate DFQ with the authors' per-candidate block forward.
# A model of your own, e.g. the ViT of examples/user_models.py (docs/RESULTS.md):
#   MODEL=examples.user_models:vit METHODS="fp32 sbm pfq dfq frac" \
#   MODEL_FLAGS="--config.model.blocks=('blocks/\d+',)" scripts/cpu_study_cifar10.sh DATA_DIR
set -euo pipefail

[[ $# -ge 1 && -d $1/train && -d $1/test ]] || {
  echo "usage: $0 DATA_DIR [OUT_ROOT]  (DATA_DIR must hold train/ and test/)" >&2; exit 2; }
DATA_DIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
OUT=${2:-runs/cpu_study}
PY=${PYTHON:-python3}
MODEL=${MODEL:-resnet20}
ITERS=${ITERS:-1500}
EVAL_EVERY=${EVAL_EVERY:-25}
TEST_SUBSET=${TEST_SUBSET:-2000}
METHODS=${METHODS:-fp32 sbm pfq dfq frac dfq_hard}
BATCH=${BATCH:-128}
read -r -a model_flags <<< "${MODEL_FLAGS:-}"
# The paper's schedule shape at this budget: lr x0.1 at 50% and 75% of the run.
B1=$((ITERS / 2)); B2=$((ITERS * 3 / 4))
mkdir -p "$OUT"

for m in $METHODS; do
  echo "=== $m ($(date -u +%H:%M:%S))"
  recipe=$m extra=()
  if [[ $m == dfq_hard ]]; then recipe=dfq extra=(--config.dfq.gate=hard); fi
  if [[ $m == dfq_per_candidate ]]; then recipe=dfq extra=(--config.dfq.forward=per_candidate); fi
  "$PY" main.py --config "configs/${recipe}_cifar10.py" --workdir "$OUT/$m" "${extra[@]}" \
    --config.data.dataset="folder:$DATA_DIR" --config.data.test_subset="$TEST_SUBSET" \
    --config.model.name="$MODEL" --config.train.iters="$ITERS" \
    --config.train.eval_every="$EVAL_EVERY" --config.optim.boundaries="($B1, $B2)" \
    --config.train.batch_size="$BATCH" "${model_flags[@]}" \
    2>&1 | grep -v -e WARNING -e '^I0000' | tail -n 5
done
"$PY" -m fractrain_jax.report $(for m in $METHODS; do echo "$OUT/$m"; done) --out "$OUT/report"
