#!/usr/bin/env bash
# Sets up mopt and asks the embedded default model a question: SmolLM2-135M-Instruct quantized to
# FP8 (+FP8 KV cache) by NVIDIA ModelOpt, built and cached on the first run (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec mopt generate --prompt "What is the capital of France?" "$@"
