#!/usr/bin/env bash
# Serving check on the GPU machine (issue 11's GPU targets), about 5 minutes on an H100:
#   1. the GPU tests of the async engine, the device sampler (penalties, logprobs) and async scheduling;
#   2. `mopt bench serve` on the llama3-8b preset with dummy FP8 weights and FP8 KV cache, 64 clients,
#      128-token prompts and outputs, against LLM.generate on the same requests in the same run
#      (target: serve output tok/s >= 90% of offline);
#   3. 200 requests of which half the clients walk away mid-answer (target: 0 server errors, 0 leaked blocks).
# Writes at most 7 files under $OUT (or ./out): gpu.txt, pip.txt, gpu-tests.txt, serve.{json,txt},
# serve-disconnect.{json,txt}.
#
# Usage (from the repository root): OUT=out bash bench/serve_gpu.sh [WHEEL_DIR] [tests|bench|all]
# (PRESET, FORMAT, CLIENTS, REQUESTS and TP, the tensor-parallel size, from the environment.)
#
# The server needs fastapi, uvicorn, pydantic>=2.12 and prometheus-client, the load generator httpx.
# Without network access they come from WHEEL_DIR (default .sweep/wheels; skipped when they import).
# Make it on a machine with network access, for the GPU machine's CPython 3.12 (pip resolves the
# dependencies for that target; all are pure-Python wheels but pydantic-core, and uvloop and httptools,
# which uvicorn uses when present for a faster event loop and HTTP parser):
#   pip download fastapi uvicorn prometheus-client httpx 'pydantic>=2.12' uvloop httptools \
#     --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .sweep/wheels
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off (TP > 1)
WHEELS=${1:-.sweep/wheels}
what=${2:-all}
PRESET=${PRESET:-llama3-8b}
FORMAT=${FORMAT:-fp8-kv}
CLIENTS=${CLIENTS:-64}
REQUESTS=${REQUESTS:-512}
TP=${TP:-1}  # tensor-parallel size (TP=2 on a 2-GPU host; the GPU tests above run on one GPU either way)

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

need="import fastapi, uvicorn, prometheus_client, httpx, pydantic; assert tuple(map(int, pydantic.VERSION.split('.')[:2])) >= (2, 12)"
if ! python3 -c "$need" 2>/dev/null; then
  if [[ -d $WHEELS ]]; then
    # Only what the wheel directory holds; uvloop/httptools on their own line, so their absence is no failure.
    python3 -m pip install --no-index --find-links "$WHEELS" fastapi uvicorn prometheus-client httpx \
      'pydantic>=2.12' 2>&1 | tail -20 > "$OUT/pip.txt"
    python3 -m pip install --no-index --find-links "$WHEELS" uvloop httptools >> "$OUT/pip.txt" 2>&1 || true
  else
    echo "no wheel directory $WHEELS, and the serve extra is missing" > "$OUT/pip.txt"
  fi
fi
python3 -c "$need" || { echo "mopt serve's packages are missing: see $OUT/pip.txt" | tee -a "$OUT/gpu.txt"; exit 1; }
python3 -c "import fastapi, uvicorn, pydantic, importlib.util as u; print('fastapi', fastapi.__version__, 'uvicorn', \
uvicorn.__version__, 'pydantic', pydantic.VERSION, 'uvloop', u.find_spec('uvloop') is not None, 'httptools', \
u.find_spec('httptools') is not None)" | tee -a "$OUT/gpu.txt"

if [[ $what == tests || $what == all ]]; then
  timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/engine/test_async_engine.py \
    tests/engine/test_penalties_logprobs.py tests/engine/test_async_scheduling.py 2>&1 | tail -30 \
    | tee "$OUT/gpu-tests.txt"
fi
if [[ $what == bench || $what == all ]]; then
  # Two model loads (server, then LLM.generate after the server exits) plus CUDA graph captures: ~1 min each.
  timeout ${BENCH_TIMEOUT:-240} python3 -m mopt.cli bench serve --dummy "$PRESET" --format "$FORMAT" -tp "$TP" \
    --concurrency "$CLIENTS" --max-num-seqs "$CLIENTS" --num-requests "$REQUESTS" --prompt-len 128 --output-len 128 \
    --offline-baseline --json "$OUT/serve.json" 2>&1 | grep -v "it/s\]\|graph/s\]\|tensor/s\]" | tail -40 \
    | tee "$OUT/serve.txt"
  timeout ${DISCONNECT_TIMEOUT:-150} python3 -m mopt.cli bench serve --dummy "$PRESET" --format "$FORMAT" -tp "$TP" \
    --concurrency "$CLIENTS" --max-num-seqs "$CLIENTS" --num-requests 200 --prompt-len 128 --output-len 128 \
    --disconnect-fraction 0.5 --json "$OUT/serve-disconnect.json" 2>&1 | grep -v "it/s\]\|graph/s\]\|tensor/s\]" \
    | tail -40 | tee "$OUT/serve-disconnect.txt"
fi
