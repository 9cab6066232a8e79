#!/usr/bin/env bash
# GPU check of the CUDA path (issue 14): CUDA tests, dense vs sparse latency on the GPU, CUDA
# graphs on/off, fp16/bf16 accuracy against fp32, train-pruner on CUDA. Under 4 minutes: parts
# start only while the run is under BUDGET_S (225 s), the most important first.
#
# Run from the repository root on a machine with a GPU (no ROS, no simulator needed):
#
#     OUT=/tmp/gpuout PYTHONPATH=. bash scripts/gpu_check.sh
#
# data/ is git-ignored: carry data/lift_rollouts_ddim10.hdf5 to the GPU machine for the
# precision check on recorded observations and the train-pruner run (without it the precision
# check falls back to random observations, and says so, and train-pruner is skipped).
#
# Every part is guarded (set +e, its own timeout): one failure does not stop the rest. What
# it writes under $OUT (6 files, so it fits a device run's 8-file limit):
#   gpu_check.log    everything, in order
#   summary.txt      one line per part: ok / FAIL (exit code) / skip, and its seconds
#   pytest_cuda.log  the CUDA tests
#   bench.jsonl      one `sparse-policy bench --json` object per line (preset/model, gates,
#                    sparsity and schedule are in each object)
#   precision.txt    `sparse-policy precision` tables (and JSON lines): fp16/bf16 and CUDA
#                    graphs against float32 eager, action error and chunk latency
#   train_pruner.log train-pruner --device cuda, one short epoch
set +e
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-.}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if ! $PY -c 'import torch' 2>/dev/null && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python  # a development checkout (the GPU machine's python3 holds torch)
fi
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
: >"$OUT/bench.jsonl"
START=$(date +%s)

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# Parts start only while the whole run stays under BUDGET_S (default 225 s, < 4 minutes).
BUDGET_S="${BUDGET_S:-225}"

# part NAME TIMEOUT_S COMMAND...: run one guarded part, log its output, record its status.
part() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ $left -le 10 ]; then
    skip "$name" "time budget spent"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "==== $name ($*)"
  local t0=$(date +%s)
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    echo "ok    ${dt}s  $name" >>"$SUMMARY"
  else
    echo "FAIL  ${dt}s  $name (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))" >>"$SUMMARY"
  fi
  log "---- $name: exit $rc after ${dt}s"
  return $rc
}

skip() { echo "skip        $1 ($2)" >>"$SUMMARY"; log "---- $1: skipped ($2)"; }

# bench_part NAME ARGS...: one `sparse-policy bench --json` run appended to bench.jsonl.
bench_part() {
  local name=$1
  shift
  part "$name" 90 bash -c "$PY -m sparse_policy_node.cli bench --json $* \
    | tee -a '$OUT/bench.jsonl'"
}

log "gpu_check: $(git rev-parse --short HEAD 2>/dev/null) $(date -u)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$LOG" 2>&1
CUDA=$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>>"$LOG")
$PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "device",
torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")' 2>&1 | tee -a "$LOG"

# 1. The CLI and the bench path import neither ROS nor the simulator.
part import-hygiene 60 $PY -c '
import sys
import sparse_policy_node.cli
import sparse_policy_node.tools.bench
import sparse_policy_node.tools.precision
import sparse_policy_node.core.engine
import sparse_policy_node.training.train_pruner
bad = [m for m in ("rclpy", "robosuite", "mujoco") if m in sys.modules]
print("heavy modules imported:", bad or "none")
sys.exit(1 if bad else 0)'

if [ "$CUDA" != "1" ]; then
  log 'no cuda: the CUDA parts are skipped (the CPU no-sync spy test still runs)'
  part cpu-spy-tests 120 $PY -m pytest -q -p no:cacheprovider test/test_core_sync.py
  for p in pytest-cuda bench-paper bench-lift-ddpm100 precision-lift-ddim10 \
    graphs-paper-ddpm100 bench-lift-ddim10 precision-lift-ddpm100 train-pruner-cuda; do
    skip "$p" 'no cuda'
  done
  log "total $(( $(date +%s) - START ))s"
  cat "$SUMMARY" | tee -a "$LOG"
  exit 0
fi

# 2. CUDA tests (and the CPU spy test, which must hold on this torch too).
part pytest-cuda 120 bash -c "$PY -m pytest -q -p no:cacheprovider -rs \
  test/test_core_engine_cuda.py test/test_training_pruner_device.py test/test_core_sync.py \
  2>&1 | tee '$OUT/pytest_cuda.log'; exit \${PIPESTATUS[0]}"

# 3. Dense vs sparse on the GPU (bench, eager torch): the paper preset (random weights,
#    DDPM-100, dial 0.93), then the shipped Lift model at DDPM-100 with the dial at 0.93.
COMMON='--device cuda --reps 8 --warmup 2'
bench_part bench-paper "$COMMON --preset paper --gates pruner --sparsity 0.93"
bench_part bench-lift-ddpm100 "$COMMON --model models/lift --sampler ddpm --steps 100 \
  --gates pruner --sparsity 0.93"

# 4. Reduced precision and CUDA graphs against the float32 eager engine (sparse-policy
#    precision): action error on the recorded Lift windows with their recorded noise (DDIM-10,
#    learned gates), then chunk latency with graphs on/off on the paper preset (DDPM-100).
ROLL=data/lift_rollouts_ddim10.hdf5
if [ -f "$ROLL" ]; then SRC="--rollouts $ROLL"; else SRC=''; log "no $ROLL: random observations"; fi
: >"$OUT/precision.txt"
precision_part() {
  local name=$1
  shift
  part "$name" 90 bash -c "$PY -m sparse_policy_node.cli precision --device cuda \
    --precisions float16,bfloat16 --cuda-graphs $* | tee -a '$OUT/precision.txt'; \
    exit \${PIPESTATUS[0]}"
}
precision_part precision-lift-ddim10 "--model models/lift $SRC --windows 48"
precision_part graphs-paper-ddpm100 "--model '' --preset paper --windows 10 --sparsity 0.93"
bench_part bench-lift-ddim10 "$COMMON --model models/lift --sampler ddim --steps 10 \
  --gates pruner --sparsity -1"
precision_part precision-lift-ddpm100 "--model models/lift $SRC --sampler ddpm --steps 100 \
  --sparsity 0.93 --windows 24"

# 5. train-pruner on CUDA: one short epoch on the DDIM-10 rollouts (not installed).
if [ -f "$ROLL" ]; then
  part train-pruner-cuda 100 bash -c "$PY -m sparse_policy_node.cli train-pruner \
    --model models/lift --rollouts $ROLL --out /tmp/gpu_check_pruner --device cuda \
    --epochs 1 --max-minutes 0.4 --val-episodes 2 2>&1 | tr '\\r' '\\n' \
    | grep -v 'frame/s' | tee '$OUT/train_pruner.log'; exit \${PIPESTATUS[0]}"
else
  skip train-pruner-cuda "no $ROLL"
fi

log "total $(( $(date +%s) - START ))s"
cat "$SUMMARY" | tee -a "$LOG"
