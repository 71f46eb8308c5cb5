#!/usr/bin/env bash
# A narrow GPU rerun: deltatune LoRA all-linear (fused vs plain loss) against peft-bf16 and the frozen floor.
set -u
export PYTHONPATH=. PYTHONWARNINGS=ignore
base='"model": "llama1b", "batch": 8, "seq": 1024, "warmup": 3, "steps": 10, "threads": 8, "device": "cuda", "dtype": "bf16", "mode": "train"'
for case in '"tuner": "lora-all", "lib": "deltatune"' '"tuner": "frozen", "lib": "torch"' \
            '"tuner": "lora-all", "lib": "deltatune", "loss": "plain"' '"tuner": "lora-all", "lib": "peft-bf16"'; do
  python3 -m bench.worker "{$base, $case}" | python3 -c "import json,sys,statistics as s; r=json.loads(sys.stdin.read()); print(r['lib'], r['tuner'], r.get('loss','fused'), 'median %.4f min %.4f peak %.0f MiB' % (s.median(r['times']), min(r['times']), r['peak_mb']))"
done
