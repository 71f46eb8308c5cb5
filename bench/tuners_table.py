"""One workload, every tuner: the "Measured figures" table of docs/tuners.md (issue 3).

Each tuner fine-tunes SmolLM2-135M-Instruct on chatterbot-en (200 rows held out, rows cut to 96
tokens, batch 8, seed 42) for the same fixed number of optimizer steps, through the public API
(`deltatune.train.train`), each in its own subprocess so that peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) belongs to that tuner alone. Recorded per tuner:
trainable parameters (`TunedModel.get_nb_trainable_parameters`), median optimizer-step time (the
loop's per-step `seconds` in logs.jsonl), peak RSS, and held-out answer loss before and after
training (`TrainResult.eval_before` / `eval_after`). Sample-answer generation is off
(`num_samples=0`), as is the loss plot.

    OMP_WAIT_POLICY=PASSIVE python bench/tuners_table.py                       # full table, 30 steps
    OMP_WAIT_POLICY=PASSIVE python bench/tuners_table.py --steps 2 --dataset 'chatterbot-en#64' \
        --val-size 16 --only lora-qv,ia3 --output /tmp/check.json                  # a quick check

Writes JSON (default bench/results/tuners_table.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
THREADS = 2

# name, registry tuner, config fields, learning rate, label for the table
LORA_QV = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
TUNERS: list[tuple[str, str, dict, float, str]] = [
    ("lora-qv", "lora", LORA_QV, 2e-3, "LoRA r8 q/v"),
    ("dora-qv", "lora", {**LORA_QV, "use_dora": True}, 2e-3, "DoRA r8 q/v"),
    ("lora-all", "lora", {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}, 2e-3, "LoRA r8 all-linear"),
    (
        "ia3",
        "ia3",
        {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        2e-3,
        "(IA)^3 k/v/down (ff: down)",
    ),
    ("prompt", "prompt_tuning", {"num_virtual_tokens": 20}, 3e-2, "prompt tuning, 20 tokens"),
    (
        "p-tuning",
        "p_tuning",
        {"num_virtual_tokens": 20, "encoder_reparameterization_type": "MLP"},
        3e-2,
        "P-tuning, 20 tokens, MLP",
    ),
    ("prefix", "prefix_tuning", {"num_virtual_tokens": 20}, 3e-2, "prefix tuning, 20 tokens"),
    (
        "adapter-houlsby",
        "adapter",
        {"adapter_type": "houlsby", "target_modules": ["o_proj", "down_proj"]},  # Houlsby's roles on Llama
        2e-3,
        "bottleneck adapter (Houlsby, o/down, width 576/16)",
    ),
    ("bitfit", "bitfit", {}, 2e-3, "BitFit"),
    ("ln-tuning", "ln_tuning", {}, 2e-3, "LN-tuning"),
    ("side-tuning", "side_tuning", {"target_modules": ["model.norm"]}, 2e-3, "side-tuning (model.norm)"),
    (
        "restuning",
        "restuning",
        {
            "stem_modules": r"model\.layers\.\d+",
            "target_modules": r"model\.norm",
            "tuner_cfg": {"res_adapter": {"adapter_length": 32}},
        },
        2e-3,
        "ResTuning (30 stems -> model.norm)",
    ),
    ("llama-pro", "llama_pro", {"num_new_blocks": 2}, 1e-4, "LLaMA-Pro, 2 new blocks"),
    ("full", "full", {}, 1e-4, "Full"),
]


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- worker: one tuner, in its own process ---------------------------------------------------
def worker(opts: argparse.Namespace) -> None:
    import resource

    import torch

    torch.set_num_threads(THREADS)
    name, tuner, fields, lr, _ = next(t for t in TUNERS if t[0] == opts.worker)
    record: dict = {"name": name, "tuner": tuner, "tuner_args": fields, "lr": lr, "steps": opts.steps}
    run_dir = Path(tempfile.mkdtemp(prefix=f"tuners-table-{name}-"))
    try:
        import deltatune as dt
        from deltatune.models import load_model, resolve_model
        from deltatune.train import TrainArgs, train

        args = TrainArgs(
            model=MODEL, dataset=opts.dataset, tuner=tuner, tuner_args=fields, output_dir=str(run_dir / "run"),
            max_steps=opts.steps, batch_size=8, lr=lr, seed=42, max_length=96, val_size=opts.val_size,
            save_steps=10**6, num_samples=0, plot=False, progress=False,
        )  # fmt: skip
        args.validate()
        config = dt.get_spec(tuner).config(**fields, task_type="CAUSAL_LM")
        source, _ = resolve_model(MODEL, log=lambda *_: None)
        base = load_model(source, dtype="fp32", task_type="CAUSAL_LM")
        record["base_params"] = sum(p.numel() for p in base.parameters())
        torch.manual_seed(args.seed)  # adapter init, as train() seeds it
        try:
            tuned = dt.get_tuned_model(base, config)
        except Exception as err:  # e.g. BitFit on a model without biases
            record["error"] = f"{type(err).__name__}: {err}"
            record["stage"] = "get_tuned_model"
            return
        trainable, total = tuned.get_nb_trainable_parameters()
        record["trainable_params"] = int(trainable)
        record["all_params"] = int(total)  # includes the adapter's tensors (Full: a second copy of the weights)
        t0 = time.time()
        result = train(args, model=tuned, log=lambda *_: None)
        record["train_seconds"] = round(time.time() - t0, 1)
        logs = [json.loads(line) for line in (result.output_dir / "logs.jsonl").read_text().splitlines() if line]
        step_s = [r["seconds"] for r in logs if r.get("event") == "train"]
        record["step_seconds"] = [round(s, 3) for s in step_s]
        record["median_step_s"] = round(statistics.median(step_s), 3)
        record["steps_done"] = result.steps
        record["eval_before"] = result.eval_before
        record["eval_after"] = result.eval_after
        record["train_loss_first_last"] = [result.losses[0], result.losses[-1]] if result.losses else None
    except Exception as err:
        record["error"] = f"{type(err).__name__}: {err}"
        record["stage"] = "train"
    finally:
        record["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        Path(opts.result).write_text(json.dumps(record, indent=1, default=str))
        shutil.rmtree(run_dir, ignore_errors=True)


# -- driver ----------------------------------------------------------------------------------
def _fmt_params(n: int) -> str:
    return f"{n:,d}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| tuner | lr | trainable params (% of base) | median step (s) | peak RSS (MiB) | held-out loss before | after | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            err = r["error"].splitlines()[0] if r["error"] else "error"
            if r.get("stage") == "get_tuned_model" and "bias" in err.lower():
                err = f"not applicable: no biases ({err})"
            elif r.get("stage") == "get_tuned_model":
                err = f"refused: {err}"
            lines.append(f"| {r['label']} | {r['lr']:g} | {err} | | | | | |")
            continue
        before, after = r["eval_before"]["loss"], r["eval_after"]["loss"]
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {_fmt_params(r['trainable_params'])} "
            f"({100 * r['trainable_params'] / r['base_params']:.3f}%) | {r['median_step_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} | {before:.4f} | {after:.4f} | {after - before:+.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per tuner")
    parser.add_argument("--dataset", default="chatterbot-en")
    parser.add_argument("--val-size", type=float, default=200)
    parser.add_argument("--only", default=None, help="comma-separated tuner names (default: all)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "tuners_table.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.val_size >= 1:
        opts.val_size = int(opts.val_size)
    if opts.worker:
        worker(opts)
        return

    wanted = opts.only.split(",") if opts.only else [t[0] for t in TUNERS]
    unknown = set(wanted) - {t[0] for t in TUNERS}
    if unknown:
        parser.error(f"unknown tuners {sorted(unknown)}; known: {[t[0] for t in TUNERS]}")
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["TOKENIZERS_PARALLELISM"] = "false"
    out = Path(opts.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": MODEL, "dataset": opts.dataset, "val_size": opts.val_size, "max_length": 96, "batch_size": 8,
        "seed": 42, "steps": opts.steps, "threads": THREADS, "omp_wait_policy": env["OMP_WAIT_POLICY"],
        "cpus": os.cpu_count(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    rows: list[dict] = []
    by_name = {t[0]: t for t in TUNERS}
    for name in wanted:  # in the order given
        _, _tuner, _fields, lr, label = by_name[name]
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            result_path = handle.name
        load_start = _loadavg()
        t0 = time.time()
        cmd = [sys.executable, __file__, "--worker", name, "--result", result_path, "--steps", str(opts.steps),
               "--dataset", opts.dataset, "--val-size", str(opts.val_size)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        try:
            record = json.loads(Path(result_path).read_text())
        except (OSError, ValueError):
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()
            record = {"name": name, "lr": lr, "error": f"worker exited {proc.returncode}: {tail[-1] if tail else ''}"}
        finally:
            Path(result_path).unlink(missing_ok=True)
        record.update(label=label, wall_s=round(time.time() - t0, 1), loadavg_start=load_start, loadavg_end=_loadavg())
        rows.append(record)
        status = record.get("error") or (
            f"loss {record['eval_before']['loss']:.4f} -> {record['eval_after']['loss']:.4f}, "
            f"median step {record['median_step_s']:.2f} s, RSS {record['peak_rss_mib']:.0f} MiB"
        )
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {record['wall_s']} s wall, load {record['loadavg_end']}: {status}",
              flush=True)  # fmt: skip
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))  # partial results survive
    print()
    print(markdown(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
