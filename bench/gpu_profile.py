"""Where a training step's GPU time goes: `PYTHONPATH=. python3 -m bench.gpu_profile '<json case>' [...]`.

Each case (the worker's format) runs its warm-up steps, then two steps under torch.profiler. Prints,
per step: wall time, the summed kernel time (the gap between the two is time the GPU waited on
the host), the kernel time by kind (GEMM, attention, elementwise/reduction, copies, optimizer),
and the kernels that took the most time.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch

from bench.worker import prepare, train_step

KINDS = (  # first match wins, on the lower-cased kernel name
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "splitk")),
    ("attention", ("flash", "fmha", "attention", "efficient")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/cast", ("copy", "memcpy", "memset", "cast", "fill")),
    ("elementwise/reduce", ("elementwise", "reduce", "softmax", "index", "scatter", "gather", "cat", "norm")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(needle in low for needle in needles):
            return kind
    return "other"


def profile(case: dict, steps: int = 2) -> dict:
    model, ids, optimizer = prepare(case)
    cuda = case.get("device") == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(case.get("warmup", 3)):
        train_step(model, case, ids, optimizer)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, case, ids, optimizer)
        sync()
        wall = (time.perf_counter() - start) / steps
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name]
            entry[0] += event.time_range.elapsed_us() / 1000 / steps  # ms per step
            entry[1] += 1 / steps
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in kernels.items():
        by_kind[kind_of(name)] += ms
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:18]
    return {
        "case": {k: v for k, v in case.items() if k not in ("model", "batch", "seq", "threads", "device", "dtype")},
        "wall_ms": wall * 1000,
        "kernel_ms": sum(ms for ms, _ in kernels.values()),
        "launches": sum(count for _, count in kernels.values()),
        "by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "top": [(name[:90], round(ms, 2), round(count)) for name, (ms, count) in top],
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
    }


def main() -> None:
    result = profile(json.loads(sys.argv[1]))
    print(f"## {result['case']}")
    print(f"wall {result['wall_ms']:.1f} ms/step, kernels {result['kernel_ms']:.1f} ms, "
          f"{result['launches']:.0f} launches, peak {result['peak_mb']:.0f} MiB")  # fmt: skip
    print("by kind: " + ", ".join(f"{kind} {ms:.1f}" for kind, ms in result["by_kind"].items()))
    for name, ms, count in result["top"]:
        print(f"  {ms:7.2f} ms  x{count:<5d} {name}")
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
