#!/usr/bin/env bash
# The paper's CIFAR-10 recipe for ResNet-38 on one NVIDIA GPU: SBM (static 8/8
# bits) and FracTrain, 64,000 iterations at batch 128 each, then the report.
# docs/GPU.md says what to collect from it.
#
# Usage: scripts/gpu_cifar10_resnet38.sh [DATA_TAR] [OUT_ROOT]
#   DATA_TAR  CIFAR-10 JPEG tarball (default: ../shared/data/cifar10-jpeg.tar.gz
#             from the repository root); it holds cifar10/{train,test}/<class>/*.jpg
#   OUT_ROOT  where the workdirs, logs and report go
#             (default: runs/cifar10_resnet38 in the repository, or
#             runs/cifar10_resnet38_itersN for a smoke run)
# Environment:
#   ITERS=2000      shortened smoke run (overrides config.train.iters only)
#   METHODS="sbm frac"   which configs/<method>_cifar10.py to run, in order
#   PYTHON=python3  the interpreter (use a virtual environment's)
#   SKIP_INSTALL=1  use the JAX already installed
#   JAX_CUDA=cuda12|cuda13  force the JAX GPU extra instead of reading the driver
#   JAX_VERSION=x.y.z       pin JAX (default: the version requirements.txt installed)
#   BENCH=0         skip the step-time benchmark
#   DRY_RUN=1       print the commands instead of running them
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_TAR=$(abspath "${1:-$REPO/../shared/data/cifar10-jpeg.tar.gz}")
OUT=$(abspath "${2:-$REPO/runs/cifar10_resnet38${ITERS:+_iters$ITERS}}")
PY=${PYTHON:-python3}
METHODS=${METHODS:-sbm frac}
cd "$REPO"

[[ -f $DATA_TAR ]] || die "CIFAR-10 tarball not found: $DATA_TAR"
if [[ -n ${ITERS:-} && ! $ITERS =~ ^[1-9][0-9]*$ ]]; then die "ITERS must be a positive integer, got '$ITERS'"; fi
for m in $METHODS; do [[ -f configs/${m}_cifar10.py ]] || die "no config configs/${m}_cifar10.py"; done
mkdir -p "$OUT"

# --- JAX for the GPU -------------------------------------------------------
# The extra follows the driver: JAX's CUDA 13 wheels need driver >= 580, its
# CUDA 12 wheels driver >= 525. Both bring CUDA and cuDNN as pip wheels, so no
# system CUDA toolkit is needed.
pick_cuda_extra() {
  if [[ -n ${JAX_CUDA:-} ]]; then printf '%s\n' "$JAX_CUDA"; return; fi
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU and driver"
  local version major
  version=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1 | tr -d ' ')
  major=${version%%.*}
  [[ $major =~ ^[0-9]+$ ]] || die "could not read the driver version from nvidia-smi ('$version')"
  if (( major >= 580 )); then echo cuda13
  elif (( major >= 525 )); then echo cuda12
  else die "NVIDIA driver $version is older than 525, the oldest JAX's CUDA 12 wheels support"
  fi
}

if [[ ${DRY_RUN:-0} == 1 ]]; then
  CUDA_EXTRA=${JAX_CUDA:-cuda12}
else
  CUDA_EXTRA=$(pick_cuda_extra)
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi
echo "JAX GPU extra: $CUDA_EXTRA"

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  run "$PY" -m pip install -r requirements.txt
  # Same JAX version as the CPU install the project was tested with, plus its CUDA plugin.
  if [[ -z ${JAX_VERSION:-} && ${DRY_RUN:-0} != 1 ]]; then
    JAX_VERSION=$("$PY" -c 'import jax; print(jax.__version__)')
  fi
  run "$PY" -m pip install "jax[$CUDA_EXTRA]${JAX_VERSION:+==$JAX_VERSION}"
fi
if [[ ${DRY_RUN:-0} != 1 ]]; then
  "$PY" -c 'import jax; d = jax.devices(); print("JAX", jax.__version__, d); assert d[0].platform == "gpu", "JAX sees no GPU"'
  "$PY" -m pip freeze > "$OUT/pip-freeze.txt"
fi

# --- data ------------------------------------------------------------------
DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/cifar10-jpeg.XXXXXX")
trap 'rm -rf "$DATA_DIR"' EXIT
run tar -xzf "$DATA_TAR" -C "$DATA_DIR"
if [[ ${DRY_RUN:-0} != 1 ]]; then
  for split in train test; do
    [[ -d $DATA_DIR/cifar10/$split ]] || die "$DATA_TAR has no cifar10/$split/ folder"
    echo "cifar10/$split: $(find "$DATA_DIR/cifar10/$split" -name '*.jpg' | wc -l) images"
  done
fi

# --- step time -------------------------------------------------------------
if [[ ${BENCH:-1} == 1 ]]; then
  if [[ ${DRY_RUN:-0} == 1 ]] || "$PY" -c 'import fractrain_jax.benchmark' 2>/dev/null; then
    # A failed measurement should not cost the two training runs.
    if ! run "$PY" -m fractrain_jax.benchmark step --model resnet38 --batch-size 128 --json \
        > "$OUT/benchmark_step_resnet38.json"; then
      echo "warning: the step-time benchmark failed; see above" >&2
    fi
    cat "$OUT/benchmark_step_resnet38.json"
  else
    echo "warning: fractrain_jax.benchmark is not importable; no step-time measurement" >&2
  fi
fi

# --- training --------------------------------------------------------------
EXTRA=()
if [[ -n ${ITERS:-} ]]; then EXTRA+=("--config.train.iters=$ITERS"); fi
WORKDIRS=()
for m in $METHODS; do
  wd=$OUT/${m}_resnet38
  WORKDIRS+=("$wd")
  if [[ -f $wd/summary.json ]]; then
    echo "$wd already finished (summary.json); delete it to train again"
    continue
  fi
  echo "=== $m: $wd"
  start=$(date +%s)
  run "$PY" main.py --config "configs/${m}_cifar10.py" --config.model.name=resnet38 \
    --config.data.dataset="folder:$DATA_DIR/cifar10" --workdir "$wd" ${EXTRA[@]+"${EXTRA[@]}"} \
    2>&1 | tee -a "$OUT/${m}_resnet38.log"
  echo "=== $m took $(( $(date +%s) - start )) s of wall time"
done

# --- report ----------------------------------------------------------------
BASELINE=()
if [[ -f $OUT/sbm_resnet38/metrics.jsonl ]]; then BASELINE=(--baseline "$OUT/sbm_resnet38"); fi
run "$PY" -m fractrain_jax.report "${WORKDIRS[@]}" ${BASELINE[@]+"${BASELINE[@]}"} --out "$OUT/report"
echo "report: $OUT/report/report.md"
