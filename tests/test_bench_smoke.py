"""The benchmark harness in its smoke mode (what CI runs of it: seconds, no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_harness_smoke_suite_runs_both_libraries(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.harness", "--suite", "smoke", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
    report = json.loads((tmp_path / "smoke.json").read_text())
    runs = report["runs"]
    assert {(r["lib"], r["mode"]) for r in runs} == {
        (lib, mode) for lib in ("deltatune", "peft") for mode in ("train", "infer-unmerged")
    } | {("deltatune-std", "train")}
    for run in runs:
        assert len(run["times"]) == report["suite"]["steps"] and all(t > 0 for t in run["times"])
        assert run["peak_mb"] > 0
    trainable = {r["lib"]: r["trainable"] for r in runs if r["mode"] == "train"}
    assert trainable["deltatune"] == trainable["deltatune-std"] == trainable["peft"] > 0  # the same adapter
    losses = {r["lib"]: r["losses"] for r in runs if r["mode"] == "train"}  # same model, batch, optimizer
    assert losses["deltatune-std"] == pytest.approx(losses["peft"], abs=1e-4)
    assert losses["deltatune"] == pytest.approx(losses["peft"], abs=1e-4)
    assert (tmp_path / "smoke.md").read_text().startswith("| tuner |")
    assert (tmp_path / "smoke.png").stat().st_size > 0


@pytest.mark.slow
def test_inference_overhead_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "bench.infer_overhead", "--model", "llama-tiny", "--batch", "2", "--seq", "16",
         "--rounds", "2", "--threads", "1"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["deltatune", "peft"]
    assert all("ratio" in line for line in lines)


@pytest.mark.slow
def test_worker_runs_a_pretrained_model_from_its_package():
    from deltatune.assets import SMOLLM2, is_available

    if not is_available(SMOLLM2):
        pytest.skip(f"SmolLM2 not installed ({SMOLLM2.install})")
    case = {"model": "smollm2", "batch": 1, "seq": 16, "warmup": 0, "steps": 1, "threads": 2, "device": "cpu",
            "dtype": "fp32", "mode": "train", "tuner": "lora-qv", "lib": "deltatune"}  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(case)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # LoRA r8 on q (576 -> 576) and v (576 -> 192) in each of SmolLM2-135M's 30 layers
    assert result["trainable"] == 30 * 8 * ((576 + 576) + (576 + 192))
    assert len(result["times"]) == 1 and result["times"][0] > 0
