#!/usr/bin/env bash
# One-command check of the project on one NVIDIA GPU box without network, in
# at most BUDGET_S seconds (default 470, under 8 minutes). docs/GPU.md says how
# to prepare the wheels folder and the data, and what comes back.
#
# Usage: scripts/device_check.sh OUT_DIR WHEELS_DIR CIFAR10_TAR
#   OUT_DIR      everything the check writes (created; logs, JSON, workdirs, report)
#   WHEELS_DIR   wheels to install from with pip --no-index (ml_collections,
#                PyYAML, pytest and its deps, ...); may be empty when nothing is missing
#   CIFAR10_TAR  the CIFAR-10 JPEG tarball (cifar10/{train,test}/<class>/*.jpg)
#
# Stages, in order, each under `timeout`; a failed or timed-out stage is
# recorded and the next one runs. OUT_DIR/summary.tsv has one line per stage:
# name, exit code (124: timed out; "skip": not run), seconds, time limit, note.
#   info     nvidia-smi, python/JAX versions, jax.devices(), pip list
#   pip      installs the missing Python packages from WHEELS_DIR
#   tests    tests/test_quant.py, test_layers.py, test_gate.py on the GPU
#            (FRACTRAIN_TEST_PLATFORM; tests/conftest.py must honour it)
#   data     extracts CIFAR10_TAR into a scratch folder
#   bench_<model>  python -m fractrain_jax.benchmark step, all methods, batch 128
#   sbm, frac      configs/{sbm,frac}_cifar10.py on the real CIFAR-10 JPEGs
#   report   python -m fractrain_jax.report over the two workdirs
#
# Environment (defaults in brackets):
#   BUDGET_S [470]      the whole script's wall-time budget in seconds
#   STAGES ["info pip tests data bench sbm frac report"]  which stages to run
#   ITERS [2000], EVAL_EVERY [200], MODEL [resnet38]      the two training runs
#   TRAIN_FLAGS [""]    more flags for main.py (e.g. --config.data.test_subset=500)
#   BENCH_MODELS ["resnet38 resnet74"], BENCH_BATCH [128], BENCH_REPEATS [10],
#   BENCH_METHODS ["fp32 static pfq dfq frac"]            the step benchmark
#   T_INFO [30] T_PIP [60] T_TESTS [100] T_DATA [40] T_BENCH [70] T_SBM [100]
#   T_FRAC [120] T_REPORT [30]  per-stage caps in seconds (each stage also stops
#                        in time to leave REPORT_RESERVE_S [25] s for the report)
#   FRACTRAIN_TEST_PLATFORM [gpu; cpu when JAX_PLATFORMS=cpu]  the tests' platform
#   SCRATCH_DIR [a new temporary folder, deleted on exit]  extracted data, decode
#                        cache, JAX compilation cache
#   KEEP_CHECKPOINTS [0] 1 keeps the workdirs' checkpoints/ (deleted by default
#                        to keep OUT_DIR small)
#   PYTHON [python3]
set -u -o pipefail

usage() { sed -n '2,/^set -u/{/^set -u/d;s/^# \{0,1\}//;p;}' "$0" >&2; exit 2; }
[[ $# -eq 3 ]] || usage
abspath() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(abspath "$1")
WHEELS=$(abspath "$2")
DATA_TAR=$(abspath "$3")
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-470}
STAGES=${STAGES:-info pip tests data bench sbm frac report}
ITERS=${ITERS:-2000}
EVAL_EVERY=${EVAL_EVERY:-200}
MODEL=${MODEL:-resnet38}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
BENCH_MODELS=${BENCH_MODELS:-resnet38 resnet74}
BENCH_BATCH=${BENCH_BATCH:-128}
BENCH_REPEATS=${BENCH_REPEATS:-10}
BENCH_METHODS=${BENCH_METHODS:-fp32 static pfq dfq frac}
REPORT_RESERVE_S=${REPORT_RESERVE_S:-25}
KILL_AFTER_S=15  # After the time limit's SIGTERM (training saves and stops), SIGKILL.
if [[ ${JAX_PLATFORMS:-} == cpu* ]]; then
  TEST_PLATFORM=${FRACTRAIN_TEST_PLATFORM:-cpu}
else
  TEST_PLATFORM=${FRACTRAIN_TEST_PLATFORM:-gpu}
fi

mkdir -p "$OUT" || { echo "cannot create $OUT" >&2; exit 2; }
if [[ -n ${SCRATCH_DIR:-} ]]; then
  SCRATCH=$(abspath "$SCRATCH_DIR"); mkdir -p "$SCRATCH"
else
  SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/fractrain_check.XXXXXX")
  trap 'rm -rf "$SCRATCH"' EXIT
fi
DATA=$SCRATCH/data/cifar10
# The decoded CIFAR-10 arrays, shared by the two training runs; compiled programs.
export FRACTRAIN_CACHE_DIR=${FRACTRAIN_CACHE_DIR:-$SCRATCH/folder_cache}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$SCRATCH/jax_cache}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
SUMMARY=$OUT/summary.tsv
printf 'stage\texit\tseconds\tlimit_s\tnote\n' > "$SUMMARY"
cd "$REPO" || exit 2

elapsed() { echo $(( $(date +%s) - START )); }
record() {  # stage rc seconds limit note
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$SUMMARY"
  printf '=== %-14s exit %-4s %4ss (limit %ss) %s\n' "$@"
}

# stage NAME CAP NOTE -- COMMAND...: runs COMMAND under timeout, output to OUT/NAME.log.
stage() {
  local name=$1 cap=$2 note=$3; shift 4
  local left=$(( BUDGET_S - $(elapsed) - KILL_AFTER_S ))
  [[ $name == report ]] || left=$(( left - REPORT_RESERVE_S ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 5 )); then
    record "$name" skip 0 "$limit" "no time left in BUDGET_S=$BUDGET_S"
    return 0
  fi
  echo "--- $name (limit ${limit}s, at $(elapsed)s): $*"
  local t0 rc
  t0=$(date +%s)
  # A function of this script runs in a child bash (timeout runs programs); the
  # time limit's signal reaches its whole process group.
  if declare -F "$1" >/dev/null; then set -- bash -c '"$@"' "$1" "$@"; fi
  timeout -k "$KILL_AFTER_S" "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [[ $rc == 124 ]] && note="timed out; $note"
  record "$name" "$rc" $(( $(date +%s) - t0 )) "$limit" "$note"
  return 0
}

wants() { [[ " $STAGES " == *" $1 "* ]]; }

# --- info -------------------------------------------------------------------
info() {
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  repo: $REPO"
  echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null) $(git -C "$REPO" status --short 2>/dev/null | wc -l) changed files"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" --version
  "$PY" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__); print(jax.devices())'
  local rc=$?
  "$PY" -m pip list 2>/dev/null
  return $rc
}

# --- pip --------------------------------------------------------------------
# import name:distribution, for what the project needs on this box.
REQUIRED=${REQUIRED:-"ml_collections:ml_collections pytest:pytest jax:jax flax:flax optax:optax orbax.checkpoint:orbax-checkpoint chex:chex absl:absl-py numpy:numpy tensorboard:tensorboard tqdm:tqdm matplotlib:matplotlib PIL:Pillow"}
SITE=$SCRATCH/site
missing_dists() {  # the distributions of REQUIRED whose module does not import
  # shellcheck disable=SC2086  # REQUIRED is a list.
  "$PY" - $REQUIRED <<'EOF'
import importlib, sys
for pair in sys.argv[1:]:
  module, dist = pair.split(":", 1)
  try:
    importlib.import_module(module)
  except Exception:  # pylint: disable=broad-except
    print(dist)
EOF
}
pip_missing() {
  local missing=() still=()
  mapfile -t missing < <(missing_dists)
  echo "missing before: ${missing[*]:-none}"
  if (( ${#missing[@]} )); then
    if ! "$PY" -m pip install --no-index --find-links "$WHEELS" "${missing[@]}"; then
      # An externally managed or read-only Python: every wheel of the folder,
      # without dependency resolution, into a folder put on PYTHONPATH.
      echo "pip install into the environment failed; installing $WHEELS/*.whl into $SITE"
      "$PY" -m pip install --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl || return 1
    fi
  fi
  mapfile -t still < <(PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} missing_dists)
  echo "missing after: ${still[*]:-none}"
  (( ${#still[@]} == 0 ))
}

# --- data -------------------------------------------------------------------
extract_data() {
  mkdir -p "$SCRATCH/data" && tar -xzf "$DATA_TAR" -C "$SCRATCH/data" || return 1
  local split n
  for split in train test; do
    [[ -d $DATA/$split ]] || { echo "$DATA_TAR has no cifar10/$split/"; return 1; }
    n=$(find "$DATA/$split" -type f | wc -l)
    echo "cifar10/$split: $n files"
  done
}

# --- training ---------------------------------------------------------------
train_run() {  # method
  # exec: the time limit's SIGTERM reaches main.py, which saves and stops.
  # shellcheck disable=SC2086  # TRAIN_FLAGS is a list of flags.
  exec "$PY" main.py --config "configs/${1}_cifar10.py" --config.model.name="$MODEL" \
    --config.data.dataset="folder:$DATA" --config.train.iters="$ITERS" \
    --config.train.eval_every="$EVAL_EVERY" --workdir "$OUT/${1}_$MODEL" $TRAIN_FLAGS
}

# --- run --------------------------------------------------------------------
export -f info missing_dists pip_missing extract_data train_run
export PY OUT REPO WHEELS DATA_TAR DATA SCRATCH SITE REQUIRED MODEL ITERS EVAL_EVERY TRAIN_FLAGS
echo "device check: OUT=$OUT BUDGET_S=$BUDGET_S STAGES='$STAGES' ITERS=$ITERS MODEL=$MODEL"
if wants info; then stage info "${T_INFO:-30}" "versions and devices in info.log" -- info; fi
if wants pip; then
  stage pip "${T_PIP:-60}" "from $WHEELS" -- pip_missing
  if [[ -d $SITE ]]; then export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}; fi
fi
if wants tests; then
  note="platform $TEST_PLATFORM"
  if [[ $TEST_PLATFORM != cpu ]] && ! grep -q FRACTRAIN_TEST_PLATFORM tests/conftest.py; then
    note="$note IGNORED: tests/conftest.py forces the CPU"
  fi
  stage tests "${T_TESTS:-100}" "$note" -- env FRACTRAIN_TEST_PLATFORM="$TEST_PLATFORM" \
    CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_quant.py tests/test_layers.py tests/test_gate.py
fi
data_ok=1
if wants data || wants sbm || wants frac; then
  stage data "${T_DATA:-40}" "into $SCRATCH/data" -- extract_data
  [[ $(tail -n 1 "$SUMMARY" | cut -f 2) == 0 ]] || data_ok=0
fi
if wants bench; then
  for m in $BENCH_MODELS; do
    # shellcheck disable=SC2086  # BENCH_METHODS is a list.
    stage "bench_$m" "${T_BENCH:-70}" "JSON lines in bench_$m.log" -- "$PY" -u -m fractrain_jax.benchmark step \
      --model "$m" --batch-size "$BENCH_BATCH" --repeats "$BENCH_REPEATS" --methods $BENCH_METHODS --json
    grep '^{' "$OUT/bench_$m.log" > "$OUT/bench_$m.json" 2>/dev/null || true
  done
fi
for method in sbm frac; do
  wants "$method" || continue
  cap_var=T_${method^^}
  if (( ! data_ok )); then
    record "$method" skip 0 0 "no data (see data.log)"
    continue
  fi
  stage "$method" "${!cap_var:-$([[ $method == sbm ]] && echo 100 || echo 120)}" \
    "workdir ${method}_$MODEL" -- train_run "$method"
done
if wants report; then
  workdirs=()
  for method in sbm frac; do
    [[ -f $OUT/${method}_$MODEL/metrics.jsonl ]] && workdirs+=("$OUT/${method}_$MODEL")
  done
  if (( ${#workdirs[@]} )); then
    baseline=()
    [[ -f $OUT/sbm_$MODEL/metrics.jsonl ]] && baseline=(--baseline "$OUT/sbm_$MODEL")
    stage report "${T_REPORT:-30}" "report/report.md" -- "$PY" -m fractrain_jax.report \
      "${workdirs[@]}" ${baseline[@]+"${baseline[@]}"} --out "$OUT/report"
  else
    record report skip 0 0 "no workdir with metrics.jsonl"
  fi
fi
if [[ ${KEEP_CHECKPOINTS:-0} != 1 ]]; then
  rm -rf "$OUT"/*_"$MODEL"/checkpoints
fi
record total - "$(elapsed)" "$BUDGET_S" "whole script"
echo "summary: $SUMMARY"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
