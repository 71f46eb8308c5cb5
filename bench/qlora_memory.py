"""Weight memory, peak memory and step time of LoRA on an fp32 base vs 8-bit and 4-bit (QLoRA) bases.

    OMP_WAIT_POLICY=PASSIVE python -m bench.qlora_memory               # ~5 min on 2 CPU cores
    python -m bench.qlora_memory --variants fp32,nf4-bf16 --steps 2    # a quick look
    python -m bench.qlora_memory --model smollm2                       # real SmolLM2-135M weights

The model is the benchmark suite's random-weight Llama (hidden 512, 8 layers, 8 heads,
intermediate 1376, vocab 32,000, untied head: 58M parameters), saved once in fp32 to a temporary
folder (or, with --model smollm2, the real SmolLM2-135M-Instruct: 30 layers, hidden 576, vocab
49,152, tied embeddings; see deltatune.assets); each variant loads it in its own process (clean
peak memory) and trains LoRA r=16 on all seven linear layers of every block with the same batch.
Variants:

    fp32       dense fp32 base                                        (the baseline)
    int8       bitsandbytes LLM.int8 linears, the rest fp32
    nf4        NF4 + double-quant linears (fp32 compute), the rest fp32
    nf4-bf16   NF4 + double-quant linears (bf16 compute), embeddings/norms/head bf16 (the QLoRA
               paper's setup)
    nf4-bf16-prep  as nf4-bf16, then prepare_for_kbit_training(use_gradient_checkpointing=False):
               norms and the dense output head go back to fp32

Figures per variant: base weight bytes (the base model's state_dict: packed weights, absmax /
row scales, everything), adapter bytes, resident memory after loading and the peak resident
memory during the training steps above the post-load level (Linux VmHWM, reset after loading),
and the median step time (forward + backward + AdamW). bitsandbytes' CPU kernels and PyTorch
each bring an OpenMP runtime; OMP_WAIT_POLICY=PASSIVE (set before Python starts, this script sets
it for its workers) keeps their idle threads from spinning against each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(
    vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False,
)  # fmt: skip
VARIANTS = ("fp32", "int8", "nf4", "nf4-bf16", "nf4-bf16-prep")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _release_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _tensor_bytes(tensors) -> int:
    """Bytes of distinct storage (a tied head and its embeddings count once)."""
    seen = {(t.untyped_storage().data_ptr(), t.numel() * t.element_size()) for t in tensors}
    return sum(size for _, size in seen)


def worker(variant: str, folder: str, batch: int, seq: int, warmup: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers

    import deltatune as dt
    from deltatune.quantization import bnb_config, prepare_for_kbit_training

    kwargs: dict = {}
    if variant == "int8":
        kwargs = dict(quantization_config=bnb_config(8), device_map="cpu")
    elif variant == "nf4":
        kwargs = dict(quantization_config=bnb_config(4, compute_dtype=torch.float32), device_map="cpu")
    elif variant.startswith("nf4-bf16"):
        kwargs = dict(
            quantization_config=bnb_config(4, compute_dtype=torch.bfloat16), device_map="cpu", dtype=torch.bfloat16
        )
    _release_freed_memory()
    rss_imports = _status_kib("VmRSS")
    model = transformers.LlamaForCausalLM.from_pretrained(folder, **kwargs)
    if variant == "nf4-bf16-prep":
        prepare_for_kbit_training(model, use_gradient_checkpointing=False)
    base_bytes = _tensor_bytes(model.state_dict().values())
    tuned = dt.get_tuned_model(model, dt.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    adapter = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapter, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    tuned.train()
    _release_freed_memory()
    rss_loaded = _status_kib("VmRSS")
    _reset_peak_rss()
    times, losses = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = tuned(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 4))
    peak = _status_kib("VmHWM")
    return dict(
        variant=variant,
        base_weight_mib=base_bytes / 2**20,
        adapter_mib=_tensor_bytes(adapter) / 2**20,
        trainable_params=sum(p.numel() for p in adapter),
        rss_imports_mib=rss_imports / 1024,
        rss_loaded_mib=rss_loaded / 1024,
        train_peak_above_loaded_mib=(peak - rss_loaded) / 1024,
        train_peak_rss_mib=peak / 1024,
        step_s_median=statistics.median(times),
        step_s_min=min(times),
        losses=losses,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["llama58m", "smollm2"], default="llama58m")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/qlora_memory.json")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        result = worker(args._worker, args._folder, args.batch, args.seq, args.warmup, args.steps, args.threads)
        print(json.dumps(result))
        return

    import torch
    import transformers

    results = []
    with tempfile.TemporaryDirectory() as folder:
        if args.model == "smollm2":
            from deltatune.assets import SMOLLM2, prepare

            folder = str(prepare(SMOLLM2))
        else:
            torch.manual_seed(0)
            transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(folder)
        env = {
            **os.environ,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "PYTHONWARNINGS": "ignore",
        }
        for variant in args.variants.split(","):
            command = [sys.executable, "-m", "bench.qlora_memory", "--_worker", variant, "--_folder", folder]
            for name in ("batch", "seq", "warmup", "steps", "threads"):
                command += [f"--{name}", str(getattr(args, name))]
            done = subprocess.run(
                command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1]
            )
            if done.returncode != 0:
                print(f"{variant} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  done {variant}", file=sys.stderr)
    baseline = next((r for r in results if r["variant"] == "fp32"), None)
    print(
        f"{args.model}: batch {args.batch} x seq {args.seq}, {args.steps} timed steps after {args.warmup} warm-up, {args.threads} threads"
    )
    print(
        "| variant | base weights MiB | % of fp32 | adapter MiB | RSS after imports MiB | RSS loaded MiB | train peak above loaded MiB | step s (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        share = f"{100 * r['base_weight_mib'] / baseline['base_weight_mib']:.1f}%" if baseline else "-"
        print(
            f"| {r['variant']} | {r['base_weight_mib']:.1f} | {share} | {r['adapter_mib']:.2f} | {r['rss_imports_mib']:.0f} | {r['rss_loaded_mib']:.0f} | "
            f"{r['train_peak_above_loaded_mib']:.0f} | {r['step_s_median']:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(dict(args={k: v for k, v in vars(args).items() if not k.startswith("_")}, results=results), indent=1)
    )


if __name__ == "__main__":
    main()
