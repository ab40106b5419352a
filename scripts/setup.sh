#!/usr/bin/env bash
# Installs mopt and its test extras. On the CPU machines we use, torch must come from the local
# CPU build (pip install torch==2.13.0); a bare "torch" pulls gigabytes of CUDA wheels. Installs
# torch only when it is missing, and then the project, so that pip reuses the installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[test]"
