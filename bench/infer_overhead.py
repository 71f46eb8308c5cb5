"""Unmerged-adapter inference overhead, base and adapter forwards interleaved in one process.

    OMP_WAIT_POLICY=PASSIVE python -m bench.infer_overhead            # deltatune and peft, CPU suite model

Across processes the harness's inference rows move by several percent on shared cores; here each
base forward (adapters disabled) is followed by an adapter forward on the same model and batch,
so drift hits both alike. The adapter's B is drawn non-zero so its path really runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(lib: str, tuner: str, model_name: str, batch: int, seq: int, rounds: int, threads: int) -> dict:
    import torch

    from bench.worker import MODELS, TUNERS, apply_tuner, build_model

    torch.set_num_threads(threads)
    model = apply_tuner(build_model(model_name, "cpu", torch.float32, None), lib, TUNERS[tuner])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01, generator=torch.Generator().manual_seed(1))
    model.eval()
    ids = torch.randint(0, MODELS[model_name]["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"base": [], "unmerged": []}
    with torch.inference_mode():
        for _ in range(2):
            model(input_ids=ids)
        for _ in range(rounds):
            with model.disable_adapter():
                start = time.perf_counter()
                model(input_ids=ids)
                times["base"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model(input_ids=ids)
            times["unmerged"].append(time.perf_counter() - start)
    base, unmerged = statistics.median(times["base"]), statistics.median(times["unmerged"])
    return {"lib": lib, "tuner": tuner, "base_s": base, "unmerged_s": unmerged, "ratio": unmerged / base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libs", default="deltatune,peft")
    parser.add_argument("--tuner", default="lora-all")
    parser.add_argument("--model", default="llama58m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one library in this process
    args = parser.parse_args()
    if args.one:
        result = measure(args.one, args.tuner, args.model, args.batch, args.seq, args.rounds, args.threads)
        print(json.dumps(result))
        return
    root = Path(__file__).resolve().parents[1]
    for lib in args.libs.split(","):  # each library in its own process: no shared allocator state
        cmd = [sys.executable, "-m", "bench.infer_overhead", "--one", lib] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['lib']:10s} {r['tuner']}: base {r['base_s']:.4f} s, unmerged {r['unmerged_s']:.4f} s, ratio {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
