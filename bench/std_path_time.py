"""Training step time through the standard call, libraries interleaved step by step in one process.

    OMP_WAIT_POLICY=PASSIVE python -m bench.std_path_time        # deltatune vs peft, lora-all, CPU suite model

On shared cores the harness's one-process-per-case timings move with everyone else's load (its
peak-memory figures do not). Here both libraries' models live in one process and train in
alternation, one step each per round, through the same call, `model(input_ids=x, labels=x).loss`,
with AdamW: load that drifts over the run hits both alike. Reported per library: median wall and
CPU (user + system of this process) seconds per step, and the ratio of deltatune's to peft's;
every step's loss, so a wrong loss could not hide behind a fast step. Peak memory is not measured
here (both models share the process): take it from `bench.harness`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libs", default="deltatune-std,peft", help="the first is compared to the last")
    parser.add_argument("--tuner", default="lora-all")
    parser.add_argument("--model", default="llama58m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    import torch

    from bench.worker import prepare, train_step

    libs = args.libs.split(",")
    base = {"model": args.model, "batch": args.batch, "seq": args.seq, "threads": args.threads, "device": "cpu",
            "dtype": "fp32", "tuner": args.tuner, "mode": "train"}  # fmt: skip
    runs = {lib: (case, *prepare(case)) for lib in libs for case in [{**base, "lib": lib}]}
    wall: dict[str, list[float]] = {lib: [] for lib in libs}
    cpu: dict[str, list[float]] = {lib: [] for lib in libs}
    losses: dict[str, list[float]] = {lib: [] for lib in libs}
    for step in range(args.warmup + args.rounds):
        order = libs if step % 2 == 0 else libs[::-1]  # neither library always goes first
        for lib in order:
            case, model, ids, optimizer = runs[lib]
            start_wall, start_cpu = time.perf_counter(), _cpu_seconds()
            loss = train_step(model, case, ids, optimizer)
            if step >= args.warmup:
                wall[lib].append(time.perf_counter() - start_wall)
                cpu[lib].append(_cpu_seconds() - start_cpu)
            losses[lib].append(round(float(loss), 5))
    result = {"config": {**base, "libs": libs, "warmup": args.warmup, "rounds": args.rounds,
                         "torch_threads": torch.get_num_threads()},  # fmt: skip
              "wall_s": wall, "cpu_s": cpu, "losses": losses}  # fmt: skip
    first, last = libs[0], libs[-1]
    for lib in libs:
        w, c = statistics.median(wall[lib]), statistics.median(cpu[lib])
        line = f"{lib:14s} wall {w:.3f} s/step (min {min(wall[lib]):.3f}, max {max(wall[lib]):.3f}), cpu {c:.3f} s/step"
        print(line + f", losses {losses[lib][0]:.5f} -> {losses[lib][-1]:.5f}")
    wall_ratio = statistics.median(wall[first]) / statistics.median(wall[last])
    cpu_ratio = statistics.median(cpu[first]) / statistics.median(cpu[last])
    paired = statistics.median(a / b for a, b in zip(wall[first], wall[last]))
    print(
        f"{first} / {last}: wall {wall_ratio:.3f}x, cpu {cpu_ratio:.3f}x, median of per-round wall ratios {paired:.3f}x"
    )
    result.update(wall_ratio=wall_ratio, cpu_ratio=cpu_ratio, paired_wall_ratio=paired)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
