#!/usr/bin/env bash
# A narrow GPU A/B of the LoRA all-linear step (Llama 1B, bf16, 8 x 1024): deltatune's default and
# with one lever off at a time (one-node LoRA autograd, lean gated MLPs, fused loss, fused AdamW),
# against the frozen floor and peft; then a kernel-time breakdown (bench/gpu_profile.py) of
# deltatune and the floor (PROFILE=0 skips it).
set -u
f='"optim": "fused", "tuner": "lora-all"'
bash bench/gpu_ab.sh "$f, \"lib\": \"deltatune\"" '"tuner": "frozen", "lib": "torch"' "$f, \"lib\": \"peft\"" \
  "$f, \"lib\": \"peft-bf16\"" "$f, \"lib\": \"deltatune\", \"one_node\": false" "$f, \"lib\": \"deltatune\", \"lean\": false" \
  "$f, \"lib\": \"deltatune\", \"loss\": \"plain\"" '"tuner": "lora-all", "lib": "deltatune", "optim": "default"'
if [ "${PROFILE:-1}" = 1 ]; then
  base='"model": "llama1b", "batch": 8, "seq": 1024, "warmup": 3, "steps": 10, "threads": 8, "device": "cuda", "dtype": "bf16", "mode": "train"'
  for case in "$f, \"lib\": \"deltatune\"" '"tuner": "frozen", "lib": "torch"'; do
    PYTHONPATH=. python3 -m bench.gpu_profile "{$base, $case}" | grep -v '^JSON'
  done
fi
