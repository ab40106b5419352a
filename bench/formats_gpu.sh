#!/usr/bin/env bash
# Every ModelOpt format on the GPU machine: the GPU tests of the formats work (the weight-only kernel family and
# both fused-MoE kernels against the reference; every format's tiny export generating on CUDA like the CPU
# path), then `mopt bench kernels` for every linear format (--json); `moe`: `mopt bench moe` for every expert
# format (moe.txt, moe.json); `e2e`: `mopt bench generate` on dummy Qwen3-30B-A3B (E2E_MOE_FORMATS) and
# Llama-3-8B (E2E_DENSE_FORMATS) models, batch 1 and 64 (e2e-moe.txt/json, e2e-dense.txt/json). The exports are built on a CPU beforehand:
#   PYTHONPATH=src:tests python3 tests/make_gpu_exports.py .sweep/exports
# and read from $MOPT_TEST_EXPORTS (default .sweep/exports). Writes at most 6 files under $OUT (or ./out):
# gpu.txt, gpu-tests.txt, kernels-{1,2}.txt, kernels-{1,2}.json. Each step has its own timeout (SIGINT, so
# pytest still lists its failures and the bench its rows; at most 9.5 minutes in all): the two pytest runs
# (the exports, then the weight-only kernels) append to gpu-tests.txt, and the bench runs in two halves,
# each saving its JSON after every format of every shape. `tests` and `bench` can also run as two calls.
# Usage: bash bench/formats_gpu.sh [tests|bench|moe|e2e|all]   (env: TEST_TIMEOUT, BENCH_TIMEOUT, BENCH_ARGS,
# FORMATS_1, FORMATS_2, MOE_FORMATS, MOE_TOKENS)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1 MOPT_TEST_EXPORTS=${MOPT_TEST_EXPORTS:-.sweep/exports}
what=${1:-all}
case $what in tests|bench|moe|e2e|all) ;; *) echo "usage: $0 [tests|bench|moe|e2e|all]" >&2; exit 2 ;; esac
# The two halves: FP8 and 8-bit formats, then 4-bit ones (names: mopt bench kernels --help).
FORMATS_1=${FORMATS_1:-fp8,fp8-pcpt,fp8-pb-wo,fp8-pb-wo-a8,int8-wo,int8-sq,mxfp8,w4a8-awq}
FORMATS_2=${FORMATS_2:-nvfp4,nvfp4-svdquant,w4a16-nvfp4,w4a8-nvfp4-fp8,int4-awq,mxfp4,mxfp4-wo,w4a8-mxfp4-fp8}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
echo "exports: $MOPT_TEST_EXPORTS ($(ls "$MOPT_TEST_EXPORTS" 2>/dev/null | wc -l) folders)" | tee -a "$OUT/gpu.txt"
status=0
if [[ $what == tests || $what == all ]]; then
  : > "$OUT/gpu-tests.txt"
  for tests in tests/engine/test_formats_gpu.py tests/kernels/test_triton_weight_only.py \
      tests/kernels/test_triton_moe.py tests/kernels/test_triton_moe_weight_only.py; do
    echo "=== pytest -m gpu $tests" | tee -a "$OUT/gpu-tests.txt"
    timeout -s INT -k 10 ${TEST_TIMEOUT:-150} python3 -m pytest -v -m gpu -p no:cacheprovider -rfEs --durations=5 \
      "$tests" 2>&1 | tee -a "$OUT/gpu-tests.txt" | grep -v PASSED | tail -25
    status=$((status | PIPESTATUS[0]))
  done
fi
if [[ $what == bench || $what == all ]]; then
  for half in 1 2; do
    formats=FORMATS_$half
    timeout -s INT -k 10 ${BENCH_TIMEOUT:-115} python3 -m mopt.cli bench kernels --formats "${!formats}" ${BENCH_ARGS:---iters 10 --repeats 3} \
      --json "$OUT/kernels-$half.json" 2>&1 | tee "$OUT/kernels-$half.txt" | tail -25
    status=$((status | PIPESTATUS[0]))
  done
fi
if [[ $what == moe ]]; then
  moe_formats=${MOE_FORMATS:-bf16,fp8,fp8-pcpt,nvfp4,fp8-pb-wo,w4a16-nvfp4,w4a8-nvfp4-fp8,int8-wo,int8-sq,mxfp8,mxfp4,mxfp4-wo,w4a8-mxfp4-fp8}
  timeout -s INT -k 10 ${BENCH_TIMEOUT:-300} python3 -m mopt.cli bench moe --formats "$moe_formats" \
    --tokens "${MOE_TOKENS:-1,16,256}" --json "$OUT/moe.json" 2>&1 | tee "$OUT/moe.txt" | tail -60
  status=$((status | PIPESTATUS[0]))
fi
if [[ $what == e2e ]]; then
  for kind in moe dense; do
    if [[ $kind == moe ]]; then preset=qwen3-30b-a3b; formats=${E2E_MOE_FORMATS:-fp8,fp8-pcpt,int8-wo,mxfp8,w4a16-nvfp4}
    else preset=llama3-8b; formats=${E2E_DENSE_FORMATS:-fp8-kv,int8-wo,w4a16-nvfp4,mxfp8,int4-awq}; fi
    timeout -s INT -k 10 ${E2E_TIMEOUT:-270} python3 -m mopt.cli bench generate --dummy $preset --format "$formats" \
      --prompt-len 128 --tokens 128 --batch 1,64 --json "$OUT/e2e-$kind.json" 2>&1 | tee "$OUT/e2e-$kind.txt" | tail -15
    status=$((status | PIPESTATUS[0]))
  done
fi
exit $status
