#!/usr/bin/env bash
# One line per case: `bash bench/gpu_ab.sh '<json fields>' ...`, each merged over the GPU suite's
# base case (Llama 1B, bf16, 8 x 1024, 3 warm-up + 10 timed steps, mode train) and run in its own process.
set -u
export PYTHONPATH=. PYTHONWARNINGS=ignore
base=${BASE:-'"model": "llama1b", "batch": 8, "seq": 1024, "warmup": 3, "steps": 10, "threads": 8, "device": "cuda", "dtype": "bf16", "mode": "train"'}
for case in "$@"; do
  python3 -m bench.worker "{$base, $case}" | python3 -c "
import json, statistics as s, sys
r = json.loads(sys.stdin.read().strip().splitlines()[-1])
keys = ('mode', 'loss', 'one_node', 'lean', 'optim', 'compile')
print(r['lib'], r['tuner'], {k: r[k] for k in keys if k in r}, 'median %.4f min %.4f max %.4f peak %.0f MiB'
      % (s.median(r['times']), min(r['times']), max(r['times']), r['peak_mb']), flush=True)"
done
