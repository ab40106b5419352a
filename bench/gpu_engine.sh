#!/usr/bin/env bash
# GPU-engine check on the device machine: the GPU tests of the engine's kernels, then the end-to-end
# benchmark (llama3-8b dummy preset, BF16 / FP8+FP8 KV / NVFP4, batch 1 and 64, HF baseline, prefill
# 8x1024, profiles). Writes logs and JSON under $OUT (or ./out). Usage: bash bench/gpu_engine.sh [tests|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -x -m gpu -p no:cacheprovider ${TESTS:-tests/kernels/test_triton_attention.py \
    tests/kernels/test_triton_glue.py tests/kernels/test_triton_gemm.py tests/engine/test_cuda_graphs.py \
    tests/engine/test_generate.py} 2>&1 | tail -40 | tee "$OUT/gpu-tests.txt"
fi
if [[ $what == bench || $what == all ]]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m mopt.cli bench generate --dummy ${PRESET:-llama3-8b} \
    --format ${FORMATS:-bf16,fp8-kv,nvfp4} --batch ${BATCH:-1,64} --prompt-len 128 --tokens 128 \
    ${BENCH_EXTRA:---baseline hf --prefill 8x1024} --profile "$OUT/profile.txt" --json "$OUT/bench.json" 2>&1 \
    | grep -v "it/s\]\|graph/s\]\|tensor/s\]" | tail -30 | tee "$OUT/bench.txt"
fi
