#!/usr/bin/env bash
# One training step of the project against its PyTorch peers, timed in one sitting
# on this machine, printed as the table of docs/RESULTS.md ("Step time against the
# PyTorch peers"). CPU only; about 25 minutes on a 2-core machine with the defaults.
#
# Usage: scripts/peer_speed.sh [AUTHORS_DIR]
#   AUTHORS_DIR  a checkout of the authors' code (git clone
#                https://github.com/GATECH-EIC/FracTrain): its FP32, static 8/8, PFQ
#                and DFQ steps are timed too; without it their row is left out.
# Environment:
#   TORCH_VENV  the throwaway venv that holds PyTorch (created on first use; default
#               ${FRACTRAIN_CACHE_DIR:-~/.cache/fractrain_jax}/peer_torch_venv). PyTorch
#               is never a dependency of the project: only this venv holds it.
#   TORCH_SPEC  what pip installs there (default torch==2.13.0, the CPU build)
#   PYTHON      the project's Python (default python3)
#   MODEL       the CIFAR ResNet (default resnet38; resnet20/38/74/110 have a peer)
#   BATCH       batch size (default 128)   REPEATS  timed steps per run (default 5)
#   ROUNDS      times every system runs, in turn (default 2): the table gives the
#               median of the rounds' medians, so a slow spell lands on all alike
#   OUT         where the raw JSON lines go (default runs/peer_speed.jsonl)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
AUTHORS_DIR=${1:-}
if [[ -n $AUTHORS_DIR && ! -d $AUTHORS_DIR/fractrain_cifar ]]; then
  echo "AUTHORS_DIR=$AUTHORS_DIR holds no fractrain_cifar/: expected a checkout of GATECH-EIC/FracTrain" >&2
  exit 2
fi
PY=${PYTHON:-python3}
MODEL=${MODEL:-resnet38}
DEPTH=${MODEL#resnet}
[[ $MODEL == resnet* && $DEPTH =~ ^[0-9]+$ ]] || {
  echo "MODEL=$MODEL; expected a CIFAR ResNet such as resnet20, resnet38, resnet74" >&2; exit 2; }
BATCH=${BATCH:-128}
REPEATS=${REPEATS:-5}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-runs/peer_speed.jsonl}
VENV=${TORCH_VENV:-${FRACTRAIN_CACHE_DIR:-$HOME/.cache/fractrain_jax}/peer_torch_venv}

if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "creating $VENV with ${TORCH_SPEC:-torch==2.13.0}" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}" numpy
fi

mkdir -p "$(dirname "$OUT")"
: > "$OUT"
TORCH_ARGS=(--depth "$DEPTH" --batch-size "$BATCH" --repeats "$REPEATS")
for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  for layout in channels_last nchw; do
    "$VENV/bin/python" scripts/peer_speed_torch.py plain --layout "$layout" "${TORCH_ARGS[@]}" >> "$OUT"
  done
  if [[ -n $AUTHORS_DIR ]]; then
    "$VENV/bin/python" scripts/peer_speed_torch.py authors --authors-dir "$AUTHORS_DIR" \
      "${TORCH_ARGS[@]}" >> "$OUT"
  fi
  # *_xla: the same steps on XLA's convs and BatchNorms (the default before
  # train.kernels' oneDNN kernels), a row of their own.
  "$PY" -m fractrain_jax.benchmark step --model "$MODEL" \
    --methods fp32 static pfq dfq frac fp32_xla static_xla pfq_xla dfq_xla frac_xla \
    --batch-size "$BATCH" --repeats "$REPEATS" --json >> "$OUT"
done
"$PY" -m fractrain_jax.benchmark.peers "$OUT"
