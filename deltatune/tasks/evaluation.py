"""`deltatune eval --task T`: a task's held-out metrics of a base model + adapter on a dataset.

Every row of --dataset is evaluated with the task's own `evaluate` (the metric `deltatune sft`
reports before and after training). A run's label table (classification tasks) and image size
come from the run folder's run.json beside the adapter (OUT/run.json for OUT/adapter), so a
new head is built exactly as the trained one was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltatune.tasks.base import headline
from deltatune.tasks.registry import get_task


def run_info(adapter: str | None) -> dict[str, Any]:
    """The `data` facts of the run that wrote `adapter` ({} when there is no run.json)."""
    if not adapter:
        return {}
    path = Path(adapter).parent / "run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("data") or {}
    except (OSError, ValueError):
        return {}


def evaluate_task(ns: Any, log=print) -> dict[str, Any]:
    """Metrics of `ns.model` (+ `ns.adapter`) on every row of `ns.dataset` for task `ns.task`.

    Raises:
        ConfigError, DataError, ModelError: bad task, data or model; AdapterLoadError: adapter mismatch.
    """
    import torch

    from deltatune.core.tuned_model import TunedModel
    from deltatune.io.peft_format import read_config
    from deltatune.train.args import TrainArgs

    if ns.adapter:
        read_config(ns.adapter)  # validate the adapter's config before any weights load
    args = TrainArgs(
        task=ns.task, model=ns.model, dataset=ns.dataset, max_length=ns.max_length, batch_size=ns.batch_size,
        seed=ns.seed, val_size=0, dtype=ns.dtype, max_new_tokens=ns.max_new_tokens,
        trust_remote_code=ns.trust_remote_code, num_samples=0,
    )  # fmt: skip
    task = get_task(ns.task)
    info = run_info(ns.adapter)
    if info.get("labels") and hasattr(task, "labels"):
        task.labels = list(info["labels"])
    processor = task.load_processor(args, log)
    data = task.prepare_data(args, processor, log)
    data.val, data.train = data.train, []  # every row is evaluated
    data.info.update({k: v for k, v in info.items() if k in ("num_labels", "labels")})
    torch.manual_seed(args.seed)
    model = task.load_model(args, data, log)
    if ns.adapter:
        model = TunedModel.from_pretrained(model, ns.adapter, is_trainable=False)
    model.eval()
    metrics = task.evaluate(model, data, args, "cpu") or {}
    if metrics:
        log(headline(metrics, "").replace("held-out ", "").replace(" :", ":", 1))
    return metrics


def run_task_eval(ns: Any) -> int:
    metrics = evaluate_task(ns)
    if ns.output:
        Path(ns.output).write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return 0
