#!/usr/bin/env bash
# The native engine's GPU check (issue 12 item 4): CUDA tests, greedy vs HF, two-process Semi-PD over
# CUDA IPC with the SM split, and a colocated vs semi_pd throughput table; <= 8 minutes on one H100,
# no Ray, no network. `scripts/gpu_check.sh --cpu-dry-run` runs the same driver on CPU (tiny model).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then py=.venv/bin/python
else py=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout --signal=TERM 490 "$py" scripts/gpu_check.py "$@"
