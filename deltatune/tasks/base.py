"""The task interface: what a task tells the training loop, and nothing more.

A task says how to load its processor (tokenizer, image transform) and model class, how to turn
validated rows into examples and examples into batches, the loss, and the evaluation metrics.
The loop (`deltatune.train.loop`) keeps everything else: accelerate, exact resume, atomic
checkpoints, guards, progress, logs and the plot. Adding a task = one file in `deltatune/tasks/`
with a class following `Task` + one line in `deltatune/tasks/registry.py`.

Loss normalisation is by *units*: `units(batch)` counts what the loss sums over (supervised
tokens for language models, rows for classifiers, pixels for noise prediction), the loop adds
them over every micro-batch and process of a step, and divides the summed `loss_sum` by that
count. So k micro-batches of b rows give the gradient of one batch of k*b rows, for every task.

A task instance lives for one run and may keep run state (its tokenizer, label names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

Log = Callable[[str], None]


@dataclass
class TaskData:
    """Examples of one run. `train`/`val` items are whatever the task's collate takes (lists of
    ints, tensors); `info` holds JSON-able facts the run needs again (label names, image size),
    `extra` anything else the task keeps for evaluation and samples (prompts, references)."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """One fine-tuning task. Optional methods the loop uses when present:

    - `supports_packing = True`: the task concatenates examples under --packing (others are refused it).
    - `check_args(args)`: refuse flags the task cannot honour (ConfigError), before anything loads.
    - `length(example) -> int`: token count (enables --group-by-length / --split-by-length).
    - `structural() -> dict`: what a resumed run must share besides the tuner config (template hash).
    - `samples(model, data, args, device) -> list[dict]`: generations shown before/after training.
    - `finish(model, out, data, args, log)`: extra outputs after the adapter is saved (images, formats).
    - `step_metrics() -> dict`: numbers of the step just taken, added to its logs.jsonl record (grpo's reward).
    """

    name: str

    def load_processor(self, args: Any, log: Log, given: Any = None) -> Any:
        """Resolve `args.model` and load the tokenizer / processor (or keep `given`)."""

    def prepare_data(self, args: Any, processor: Any, log: Log) -> TaskData:
        """Load, validate, split and encode `args.dataset` (before the model loads)."""

    def load_model(self, args: Any, data: TaskData, log: Log) -> nn.Module:
        """The base model (not yet tuned), with any new head sized from `data.info`."""

    def tuner_defaults(self, args: Any, model: nn.Module | None, model_spec: Any) -> dict[str, Any] | None:
        """Tuner config fields used where --tuner-args leaves them unset (targets, head, task_type).
        Called with model=None first (before the model loads, so resume checks stay cheap): return
        None when the defaults need the model, and the loop loads it and asks again."""

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Examples -> one batch of tensors (on the CPU)."""

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms `loss_sum` adds up for this batch (tokens, rows, ...)."""

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the per-unit losses of the batch (a 0-dim tensor with a graph)."""

    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        """Held-out metrics (None when there are no held-out rows). The first key is the headline."""


def batched(items: list, size: int):
    """Consecutive slices of `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def headline(metrics: dict[str, Any], when: str) -> str:
    """'held-out accuracy before: 0.1000 (loss 2.3026, rows 200)': the first metric leads."""
    (key, value), *rest = metrics.items()
    others = ", ".join(_fmt(k, v) for k, v in rest)
    return f"held-out {key} {when + ':':<7} {value:.4f}" + (f" ({others})" if others else "")


def _fmt(key: str, value: Any) -> str:
    return f"{key} {value:.4g}"
