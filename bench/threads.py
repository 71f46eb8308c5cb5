"""Step time of the default `deltatune sft` run alone and next to competing CPU-bound processes.

    python -m bench.threads --steps 6 --competitors 0 1 --env default OMP_NUM_THREADS=1

Each case runs `deltatune sft --max-steps N --val-size 0 --num-samples 0` (the default job's model,
data, batch and length; no held-out evaluation or samples, so only training steps are timed) in
its own process, with `--competitors K` busy-looping Python processes started before it and
stopped after it. Reported: median seconds per step over the steps after the first, the run's CPU
seconds (user + system of the child), the load average when it started, and the losses (so a
thread setting that changes the numbers shows up). The figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_BUSY = "while True: pass"


def run_case(steps: int, competitors: int, env_changes: dict[str, str], extra: list[str]) -> dict:
    """One `deltatune sft` run; returns its timings and losses."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_changes)
    busy = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(competitors)]
    try:
        time.sleep(1.0 if busy else 0.0)  # let the competitors reach the run queue
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            argv = [sys.executable, "-m", "deltatune.cli.main", "sft", "--max-steps", str(steps), "--val-size", "0",
                    "--num-samples", "0", "--output-dir", str(out), *extra]  # fmt: skip
            started = time.time()
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            wall = time.time() - started
            if done.returncode != 0:
                raise SystemExit(f"run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
            records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    train = [r for r in records if r["event"] == "train"]
    seconds = [r["seconds"] for r in train]
    threads_line = next((line for line in done.stdout.splitlines() if line.startswith("threads:")), "")
    return {
        "env": env_changes or "default",
        "extra": extra,
        "competitors": competitors,
        "load_avg_1m": round(load, 2),
        "median_step_s": round(statistics.median(seconds[1:] or seconds), 3),
        "steps_s": [round(s, 3) for s in seconds],
        "cpu_s": round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 1),
        "wall_s": round(wall, 1),
        "losses": [r["loss"] for r in train],
        "threads_line": threads_line,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--competitors", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--env", nargs="+", default=["default"], help="'default' or KEY=VALUE[;KEY=VALUE] per case (environment)"
    )
    parser.add_argument("--extra", default="", help="extra sft flags for every case, space-separated")
    parser.add_argument("--json", help="append the results as JSON lines to this file")
    ns = parser.parse_args(argv)
    for spec in ns.env:
        changes = {} if spec == "default" else dict(kv.split("=", 1) for kv in spec.split(";"))
        for competitors in ns.competitors:
            row = run_case(ns.steps, competitors, changes, ns.extra.split())
            print(json.dumps(row), flush=True)
            if ns.json:
                with open(ns.json, "a", encoding="utf-8") as file:
                    file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
