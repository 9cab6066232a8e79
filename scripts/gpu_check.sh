#!/usr/bin/env bash
# GPU check of issue 24 (sparse on the GPU: one CUDA graph per chunk, gates read on the
# device), in under 10 minutes on one H100 / H200. Parts start only while the run is under
# BUDGET_S (default 560 s), the most important first; each is guarded (its own timeout, set +e):
#
#   1. env          torch / CUDA versions, whether conditional graph nodes are available
#   2. pytest-cuda  the CUDA tests: whole-chunk graph == eager, replays never synchronise,
#                   capture failure falls back, step graphs, reuse rules, CPU spy test
#   3. graphs-*     `sparse-policy bench --json --graph whole|step` per row of
#                   tools/graph_rows.py (shipped Lift DDIM-5, DDIM-10, DDPM-100; `paper`
#                   DDPM-100, DDIM-10): dense whole-chunk graph vs sparse whole-chunk graph vs
#                   step graphs, then graph_summary.json with the ratios and the verdict
#   4. eval-*       closed loop on the GPU: 50 Lift seeds, default vs dense, float32 then
#                   float16 (`sparse-policy eval --device cuda`)
#   5. bench-node   the policy node on the GPU (`bench-node --device cuda`), observation-to-
#                   chunk p50 / p99, where ROS (rclpy) imports
#   6. precision    (if time is left) fp16/bf16 vs fp32 on the recorded Lift windows
#
# Run on the GPU machine from the repository root, carrying gpu_carry/ (made here by
# scripts/gpu_carry.sh: mujoco wheels, a trimmed robosuite, a numba stub) for parts 4-5:
#
#     OUT=/tmp/gpuout PYTHONPATH=. bash scripts/gpu_check.sh
#
# Without a GPU, --dry-run runs every part small on the CPU (tiny preset rows, 2 episodes per
# eval variant, 1 lockstep bench-node episode) to prove the script end to end:
#
#     OUT=/tmp/dry PYTHONPATH=. bash scripts/gpu_check.sh --dry-run
#
# What it writes under $OUT (8 files at most, a device run's limit):
#   gpu_check.log       everything, in order
#   summary.txt         one line per part: ok / FAIL (exit code) / skip, and its seconds
#   pytest_cuda.log     the CUDA tests
#   bench.jsonl         one `bench --json` object per (row, graph form)
#   graph_summary.json  per row dense / whole / step ms and ratios; verdict (<= 0.7x dense on
#                       every row, paper DDPM-100 <= 8 ms)
#   eval.jsonl          one `eval --json` report per precision (success, chunk ms per variant)
#   bench_node.json     `bench-node --json` (p50 / p99 per variant)
#   precision.txt       `sparse-policy precision` tables
set +e
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-.}"
export PYTHONUNBUFFERED=1
export MUJOCO_GL="${MUJOCO_GL:-egl}"
PY="${PYTHON:-python3}"
if ! $PY -c 'import torch' 2>/dev/null && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python  # a development checkout (the GPU machine's python3 holds torch)
fi
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
: >"$OUT/bench.jsonl"
: >"$OUT/eval.jsonl"
START=$(date +%s)
BUDGET_S="${BUDGET_S:-560}"

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

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

CLI="$PY -m sparse_policy_node.cli"
if [ $DRY = 1 ]; then
  DEVICE=cpu EPISODES=2 WORKERS=1 NODE_EPISODES=1 ROWS_FLAG=--dry-run EVAL_LIMIT='--max-steps 40'
else
  DEVICE=cuda EPISODES=50 WORKERS=12 NODE_EPISODES=3 ROWS_FLAG= EVAL_LIMIT=
fi

# 1. What this machine has.
log "gpu_check: $(git rev-parse --short HEAD 2>/dev/null) $(date -u) dry_run=$DRY"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$LOG" 2>&1
part env 60 $PY -c '
import sys, torch
from sparse_policy_node.core.chunk_graph import conditional_nodes
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name())
    print("conditional graph nodes:", conditional_nodes(torch.device("cuda")))'
if [ $DRY = 0 ] && [ "$($PY -c 'import torch; print(int(torch.cuda.is_available()))')" != 1 ]; then
  log 'no CUDA device: run with --dry-run on a machine without a GPU'
  cat "$SUMMARY" | tee -a "$LOG"
  exit 1
fi

# 2. Tests (on the CPU in a dry run: the CUDA tests skip, the CPU ones run).
part pytest-cuda 150 bash -c "$PY -m pytest -q -p no:cacheprovider -rs \
  test/test_core_engine_cuda.py test/test_core_chunk_graph.py test/test_core_reuse.py \
  test/test_core_sync.py 2>&1 | tee '$OUT/pytest_cuda.log'; exit \${PIPESTATUS[0]}"

# 3. Dense whole-chunk graph vs sparse whole-chunk graph vs step graphs, row by row.
$PY -m sparse_policy_node.tools.graph_rows args $ROWS_FLAG >"$OUT/.rows" 2>>"$LOG"
n=0
while read -r args; do
  n=$((n + 1))
  part "graphs-$n" 75 bash -c "$CLI bench $args | tail -n 1 | tee -a '$OUT/bench.jsonl'"
done <"$OUT/.rows"
rm -f "$OUT/.rows"
part graph-summary 30 bash -c "$PY -m sparse_policy_node.tools.graph_rows summarize \
  '$OUT/bench.jsonl' >'$OUT/graph_summary.json'"

# 4-5 need the simulator: from gpu_carry/ where it is not installed.
if ! $PY -c 'import robosuite, mujoco' >/dev/null 2>&1 && [ -d gpu_carry ]; then
  log 'installing the simulator from gpu_carry/'
  SITE="$(mktemp -d)"
  $PY -m pip install -q --no-index --find-links gpu_carry/wheels --target "$SITE" \
    mujoco termcolor >>"$LOG" 2>&1
  tar xzf gpu_carry/robosuite.tgz -C "$SITE" >>"$LOG" 2>&1
  export PYTHONPATH="$PYTHONPATH:$SITE"
  $PY -c 'import numba' >/dev/null 2>&1 || export PYTHONPATH="$PYTHONPATH:$PWD/gpu_carry/stub"
fi
if [ $DRY = 1 ] && [ -d gpu_carry ]; then
  # prove the carried simulator here too: the trimmed robosuite and the numba stub first
  SITE="$(mktemp -d)"
  tar xzf gpu_carry/robosuite.tgz -C "$SITE"
  export PYTHONPATH="$SITE:$PWD/gpu_carry/stub:$PYTHONPATH"
fi
if $PY -c 'import robosuite, mujoco, numba; print("robosuite", robosuite.__file__,
"numba", numba.__file__)' >>"$LOG" 2>&1; then
  for precision in float32 float16; do
    part "eval-$precision" 150 bash -c "$CLI eval --model models/lift --device $DEVICE \
      --precision $precision --episodes $EPISODES --workers $WORKERS --variants default dense \
      --no-deviation $EVAL_LIMIT --json --out '$OUT/.eval-$precision' | tail -n 1 \
      | tee -a '$OUT/eval.jsonl'"
  done
  if $PY -c 'import rclpy' >/dev/null 2>&1; then
    part bench-node 150 bash -c "$CLI bench-node --model models/lift --device $DEVICE \
      --episodes $NODE_EPISODES --mode lockstep --variants learned off \
      $([ $DRY = 1 ] && echo '--max-episode-steps 16') --json --out '$OUT/.bench_node' \
      | tail -n 1 >'$OUT/bench_node.json'"
  else
    skip bench-node 'rclpy does not import (ROS is not installed on this machine)'
  fi
else
  skip eval-float32 'robosuite / mujoco do not import (carry gpu_carry/, see scripts/gpu_carry.sh)'
  skip eval-float16 'robosuite / mujoco do not import'
  skip bench-node 'robosuite / mujoco do not import'
fi
rm -rf "$OUT/.eval-float32" "$OUT/.eval-float16" "$OUT/.bench_node"

# 6. Reduced precision on the recorded windows (issue 14's check), if time is left.
if [ $DRY = 0 ]; then
  ROLL=data/lift_rollouts_ddim10.hdf5
  if [ -f "$ROLL" ]; then SRC="--rollouts $ROLL"; else SRC=''; fi
  part precision-lift-ddim10 90 bash -c "$CLI precision --device cuda \
    --precisions float16,bfloat16 --cuda-graphs --model models/lift $SRC --windows 48 \
    | tee '$OUT/precision.txt'; exit \${PIPESTATUS[0]}"
fi

log "total $(( $(date +%s) - START ))s"
cat "$SUMMARY" | tee -a "$LOG"
