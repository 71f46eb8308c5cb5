#!/usr/bin/env bash
# The GPU checks and suite in one call (device tool: run from the repo root, $OUT collects results).
set -u
export PYTHONPATH=. PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__)"
timeout 120 python3 bench/gpu_checks.py 2>&1 | tail -4
timeout 420 python3 -m bench.harness --suite gpu --out "$OUT" 2>&1 | grep -v "^- "
