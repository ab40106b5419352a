#!/usr/bin/env bash
# Sets up mopt and runs its main job on the embedded default model: build SmolLM2-135M-Instruct
# quantized to FP8 (+FP8 KV cache) by NVIDIA ModelOpt (cached after the first run) and inspect it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec mopt inspect "$@"
