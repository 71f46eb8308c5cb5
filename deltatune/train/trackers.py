"""--report-to tensorboard|wandb|mlflow: the metrics log's records also go to accelerate's trackers.

OUT/logs.jsonl and OUT/loss.png stay the record of a run; a tracker gets the numeric fields of
each record under "<event>/<field>" (train/loss, eval/accuracy, ...) at the record's step.
TensorBoard event files go to OUT/runs/. A missing tracker package is a ConfigError naming the
install command, raised before anything loads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_tracker(report_to: str | None) -> None:
    """Raises ConfigError when the tracker's package is not installed."""
    if report_to is None:
        return
    from deltatune.core.config import ConfigError

    package = PACKAGES[report_to]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"--report-to {report_to} needs the {package} package: pip install {package}")


class TrackedLog:
    """A MetricsLog whose writes are also logged to the accelerator's trackers."""

    def __init__(self, metrics: Any, accelerator: Any, out: Path, config: dict[str, Any]):
        self.metrics, self.accelerator = metrics, accelerator
        flat = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(out.name or "deltatune", config=flat)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metrics, name)

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        event = record.get("event", "log")
        values = {
            f"{event}/{k}": v
            for k, v in record.items()
            if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if values:
            self.accelerator.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.accelerator.end_training()
