"""Training memory of ResTuning and side-tuning (never backpropagate the backbone) vs LoRA.

    OMP_WAIT_POLICY=PASSIVE python -m bench.side_memory            # ~1 min on 2 CPU cores

Same random-weight Llama built from config (hidden 512, 8 layers, 8 heads, intermediate 1376,
vocab 8,000, untied head), same batch (4 x 256 random tokens, labels = inputs), AdamW, each tuner
in its own process (clean peak memory). Figures per tuner:

- saved for backward: bytes of distinct tensor storage, other than the model's own parameters, that
  autograd keeps from one training forward for the backward (torch.autograd.graph.saved_tensors_hooks),
  exact and repeatable: the activation memory each method needs;
- peak RSS above loaded: peak resident memory during the training steps (Linux VmHWM, reset after
  loading and wrapping) minus the resident memory then: activations, gradients, AdamW state, slack;
- trainable parameters, and the median step time (indicative only on shared CPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = dict(
    vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False,
)  # fmt: skip
TUNERS = ("lora", "restuning", "side_tuning")


def _config(name: str):
    import deltatune as dt

    if name == "lora":  # peft's usual setup: attention q/v
        return dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if name == "restuning":  # bypass over every block, joining at the final norm's input
        return dt.ResTuningConfig(
            stem_modules=r"model\.layers\.\d+", target_modules=r"model\.norm", task_type="CAUSAL_LM",
            tuner_cfg={"res_adapter": {"adapter_length": 64}},
        )  # fmt: skip
    return dt.SideTuningConfig(
        target_modules=["model.norm"], side_hidden_size=512, alpha_init=0.5, task_type="CAUSAL_LM"
    )


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(name: str, batch: int, seq: int, steps: int, threads: int) -> dict:
    import ctypes
    import gc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    tuned = dt.get_tuned_model(model, _config(name))
    tuned.train()
    trainable, _ = tuned.get_nb_trainable_parameters()
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-4)

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = tuned(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 4))
    peak = _status_kib("VmHWM")
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in tuned.parameters()}  # held anyway: not activations

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = tuned(input_ids=ids, labels=ids).loss  # noqa: F841 (the forward is what is measured)
    return {
        "tuner": name, "trainable": trainable, "saved_for_backward_mib": round(sum(saved.values()) / 2**20, 1),
        "rss_loaded_mib": round(loaded / 1024), "train_peak_above_loaded_mib": round((peak - loaded) / 1024),
        "step_s_median": round(statistics.median(times), 2), "losses": losses,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tuners", default=",".join(TUNERS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.steps, args.threads)))
        return
    rows = []
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for name in args.tuners.split(","):
        command = [sys.executable, "-m", "bench.side_memory", "--worker", name, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "side_memory.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
