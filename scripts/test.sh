#!/usr/bin/env bash
# Sets up (see setup.sh) and runs the CPU test suite, Triton kernels through its interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
