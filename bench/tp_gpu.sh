#!/usr/bin/env bash
# Tensor parallelism on a host with 2 or more GPUs (NCCL). TPS (default 2) lists the tensor-parallel sizes
# measured against TP=1, e.g. TPS=2,4 on 4 GPUs; the tests run at the largest. Stages, in this order, each
# skipped when less time is left than it needs (BUDGET_S, default 570 s, bounds the whole run; STAGES picks a subset):
#   tests  the GPU tensor-parallel tests (tests/parallel/test_tp_gpu.py, measured errors kept by -rP)
#   allreduce  NCCL against the one-shot all-reduce, eager and in CUDA graphs (bench/tp_allreduce.py, over the largest of TPS)
#   8b     mopt bench generate --dummy llama3-8b in FORMATS (default BF16, FP8+FP8 KV, NVFP4 and per-channel FP8),
#          batch 1 and 64, -tp 1 then each of TPS
#   moe    the same for qwen3-30b-a3b in FP8: -tp 1, then each of TPS with --enable-expert-parallel
#   70b    llama3-70b in FP8 (70 GB of weights, more than one H100 holds) at each of TPS, batch 1 and 64
#   prefill  prefill latency (time to first token) of the dense model in FP8 + FP8 KV at -tp 1 and each of TPS
#          (bench/prefill_latency.py, median of 5; not in the default STAGES)
#   floor  the host's floor of a decode step: the dense model's config with 2 layers (almost no GPU work), BF16 and
#          FP8 + FP8 KV, batch 1 and 64, at -tp 1 and each of TPS (floor-tpN.json; not in the default STAGES)
#   twoshot  the dense model again at each of TPS with MOPT_TP_TWO_SHOT_ROWS=${TWO_SHOT_ROWS:-16} (two-shot fused
#          all-reduce from that many rows; tpN-two-shot.json, against tpN.json of the 8b stage; not in the default)
# Writes under $OUT (default ./out): summary.txt (GPUs, versions, stage results, the speed-up table),
# speedups-tpN.json, tests.txt, allreduce.json, tp1.json, tp2.json (tpN.json for each N of TPS), moe-tp1.json,
# moe-tp2.json, 70b-tp2.json,
# prefill.txt (the device tool brings back 8 files, so leave stages out there).
# Usage: OUT=out bash bench/tp_gpu.sh            (mopt from this tree: PYTHONPATH=src)
# DENSE, MOE, BIG (presets or config.json paths) and BENCH_ARGS override what is measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# NVLink multicast stays off for every process (mopt sets NCCL's too; the others are the host's rule).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
BUDGET_S=${BUDGET_S:-570}
STAGES=${STAGES:-tests,allreduce,8b,moe,70b}
IFS=, read -r -a TPS <<< "${TPS:-2}"
TP_MAX=$(printf '%s\n' "${TPS[@]}" | sort -n | tail -1)
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
LOG=$(mktemp); trap 'rm -f "$LOG"' EXIT
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
note() { echo "$*" | tee -a "$SUMMARY"; }
wants() { [[ ",$STAGES," == *",$1,"* ]]; }

# stage NAME NEEDS_S TIMEOUT_S COMMAND...: runs COMMAND under a timeout if NEEDS_S seconds are left.
stage() {
  local name=$1 needs=$2 limit=$3; shift 3
  if (( $(left) < needs )); then note "== $name: skipped ($(left) s left, needs $needs)"; return 1; fi
  (( limit > $(left) )) && limit=$(left)
  local t0=$(date +%s)
  note "== $name (timeout $limit s): $*"
  timeout --kill-after=15 "$limit" "$@" > "$LOG" 2>&1
  local rc=$?
  grep -v "it/s\]\|graph/s\]\|tensor/s\]" "$LOG" | tail -25 >> "$SUMMARY"
  note "== $name: exit $rc after $(( $(date +%s) - t0 )) s"
  return $rc
}

: > "$SUMMARY"
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv 2>&1 | tee -a "$SUMMARY"
nvidia-smi topo -m 2>/dev/null | head -4 >> "$SUMMARY"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', \
  torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())" 2>&1 | tee -a "$SUMMARY"
git log -1 --format='mopt %h %s' 2>/dev/null | tee -a "$SUMMARY"

if wants tests; then
  export MOPT_TEST_TP=$TP_MAX
  stage "tests at TP=$TP_MAX" 60 300 python3 -m pytest -q -rP -m gpu -p no:cacheprovider -o faulthandler_timeout=240 tests/parallel/test_tp_gpu.py
  grep -v "it/s\]" "$LOG" | tail -120 > "$OUT/tests.txt"
fi

if wants allreduce; then
  stage allreduce 60 90 python3 bench/tp_allreduce.py --ranks "$TP_MAX" --json "$OUT/allreduce.json"
fi

DENSE=${DENSE:-llama3-8b} MOE=${MOE:-qwen3-30b-a3b} BIG=${BIG:-llama3-70b}
# per-channel FP8 is here because its TP=2 decode ran slower than TP=1 for weeks unseen (its row-parallel amaxes)
FORMATS=${FORMATS:-bf16,fp8-kv,nvfp4,fp8-pcpt}
read -r -a BENCH_ARGS <<< "${BENCH_ARGS:---batch 1,64 --prompt-len 128 --tokens 128}"
BENCH=(python3 -m mopt.cli bench generate "${BENCH_ARGS[@]}")
if wants 8b; then
  if stage "$DENSE -tp 1" 150 130 "${BENCH[@]}" --dummy "$DENSE" --format "$FORMATS" -tp 1 --json "$OUT/tp1.json"; then
    for tp in "${TPS[@]}"; do
      stage "$DENSE -tp $tp" 110 150 "${BENCH[@]}" --dummy "$DENSE" --format "$FORMATS" -tp "$tp" \
        --json "$OUT/tp$tp.json"
    done
  fi
fi
if wants moe; then
  if stage "$MOE -tp 1" 150 110 "${BENCH[@]}" --dummy "$MOE" --format fp8 -tp 1 --json "$OUT/moe-tp1.json"; then
    for tp in "${TPS[@]}"; do
      stage "$MOE -tp $tp expert parallel" 90 130 "${BENCH[@]}" --dummy "$MOE" --format fp8 -tp "$tp" \
        --enable-expert-parallel --json "$OUT/moe-tp$tp.json"
    done
  fi
fi
if wants 70b; then
  for tp in "${TPS[@]}"; do
    stage "$BIG fp8 -tp $tp" 100 160 "${BENCH[@]}" --dummy "$BIG" --format fp8 -tp "$tp" --json "$OUT/70b-tp$tp.json"
  done
fi

if wants floor; then
  FLOOR_CONFIG="$OUT/floor-config.json"
  python3 -c "import sys; from mopt.engine.dummy import load_config; c = load_config(sys.argv[1]); \
c.num_hidden_layers = 2; open(sys.argv[2], 'w').write(c.to_json_string())" "$DENSE" "$FLOOR_CONFIG"
  for tp in 1 "${TPS[@]}"; do
    stage "$DENSE with 2 layers -tp $tp (host floor)" 60 100 "${BENCH[@]}" --dummy "$FLOOR_CONFIG" --format bf16,fp8-kv \
      -tp "$tp" --json "$OUT/floor-tp$tp.json"
  done
fi

if wants twoshot; then
  for tp in "${TPS[@]}"; do
    MOPT_TP_TWO_SHOT_ROWS=${TWO_SHOT_ROWS:-16} stage "$DENSE -tp $tp two-shot from ${TWO_SHOT_ROWS:-16} rows" 110 150 \
      "${BENCH[@]}" --dummy "$DENSE" --format "$FORMATS" -tp "$tp" --json "$OUT/tp$tp-two-shot.json"
  done
fi

if wants prefill; then
  for tp in 1 "${TPS[@]}"; do
    stage "$DENSE prefill -tp $tp" 60 100 python3 bench/prefill_latency.py --preset "$DENSE" --format fp8-kv \
      --cases 1x128,1x512,1x2048,8x128,16x128 --repeats 5 --profile-tokens 0 -tp $tp
    grep -E "ready|prefill " "$LOG" >> "$OUT/prefill.txt"
  done
fi

for tp in "${TPS[@]}"; do
  note "== speed-ups (TP=$tp over TP=1, same host and run)"
  python3 bench/tp_speedup.py --tp "$tp" "$OUT/speedups-tp$tp.json" "$DENSE=$OUT/tp1.json:$OUT/tp$tp.json" \
    "$MOE=$OUT/moe-tp1.json:$OUT/moe-tp$tp.json" \
    $(wants floor && echo "$DENSE-2-layers=$OUT/floor-tp1.json:$OUT/floor-tp$tp.json") \
    $(wants twoshot && echo "$DENSE-two-shot=$OUT/tp1.json:$OUT/tp$tp-two-shot.json") 2>&1 | tee -a "$SUMMARY"
done
note "total $(( $(date +%s) - START )) s"
