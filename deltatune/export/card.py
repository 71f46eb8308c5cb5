"""The model card (README.md) uploaded with an adapter, merged model or GGUF.

Everything on it is read from files, never guessed: the adapter's config (tuner, base model, r, targets),
the training run beside the adapter when there is one (`OUT/run.json`: data sets and the command's
non-default flags; `OUT/logs.jsonl`: held-out loss before/after, last training loss, steps), and the
export's own file list. The YAML header carries `library_name: peft` and `base_model`, which the
hubs use to show the repository as an adapter of that model.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"


def find_run(adapter_dir: str | Path | None) -> Path | None:
    """The training run folder an adapter came from (`OUT` for `OUT/adapter`), or None."""
    if adapter_dir is None:
        return None
    adapter = Path(adapter_dir)
    for folder in (adapter.parent, adapter):
        if (folder / "run.json").is_file():
            return folder
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_metrics(run: Path | None) -> dict[str, Any]:
    """Held-out loss before/after, the last training loss and the step count from `run/logs.jsonl`."""
    if run is None or not (run / "logs.jsonl").is_file():
        return {}
    evals: list[dict[str, Any]] = []
    trains: list[dict[str, Any]] = []
    for line in (run / "logs.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "eval" and "loss" in record:
            evals.append(record)
        elif record.get("event") == "train" and "loss" in record:
            trains.append(record)
    metrics: dict[str, Any] = {}
    if evals:
        metrics["eval_loss_before"] = evals[0]["loss"]
        metrics["eval_loss_after"] = evals[-1]["loss"]
        if "accuracy" in evals[-1]:
            metrics["eval_accuracy_after"] = evals[-1]["accuracy"]
    if trains:
        metrics["train_loss_last"] = trains[-1]["loss"]
        metrics["steps"] = trains[-1].get("step")
    return metrics


def training_command(run: Path | None) -> str | None:
    """`deltatune sft ...` with the run's non-default arguments (from run.json)."""
    if run is None:
        return None
    args = _read_json(run / "run.json").get("args")
    if not isinstance(args, dict):
        return None
    from dataclasses import fields

    from deltatune.train.args import TrainArgs

    defaults = {f.name: getattr(TrainArgs(), f.name) for f in fields(TrainArgs)}
    skip = {"output_dir", "overwrite", "resume", "progress", "plot"}
    parts = ["deltatune", "sft"]
    for key, value in args.items():
        if key in skip or value is None or (key in defaults and defaults[key] == value):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value is False:
            continue
        elif isinstance(value, dict):
            parts += [flag, ",".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items())]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def model_card(
    *,
    base_model: str | None,
    adapter_config: dict[str, Any] | None,
    what: str,
    files: list[str],
    run: Path | None = None,
) -> str:
    """The README.md text (YAML header + body)."""
    run_info = _read_json(run / "run.json") if run else {}
    args = run_info.get("args") if isinstance(run_info.get("args"), dict) else {}
    datasets = [d for d in str(args.get("dataset") or "").split(",") if d]
    metrics = run_metrics(run)
    command = training_command(run)
    tuner = (adapter_config or {}).get("peft_type") or args.get("tuner")
    header = ["---", f"library_name: {_library(files)}"]
    if base_model:
        header.append(f"base_model: {json.dumps(base_model)}")
    header += ["tags:", "  - deltatune"]
    if tuner:
        header.append(f"  - {str(tuner).lower()}")
    hub_datasets = [d for d in (_hub_dataset(d) for d in datasets) if d]
    if hub_datasets:
        header += ["datasets:", *[f"  - {json.dumps(d)}" for d in hub_datasets]]
    header.append("---")
    body = [f"# {what}", "", f"Fine-tuned with deltatune from `{base_model or 'a local base model'}`.", ""]
    if adapter_config:
        shown = {
            k: v for k, v in adapter_config.items() if v not in (None, [], {}, False) and k != "base_model_name_or_path"
        }
        body += ["## Tuner", "", "```json", json.dumps(shown, indent=1, sort_keys=True, default=str), "```", ""]
    if datasets:
        body += ["## Data", "", *[f"- `{d}`" for d in datasets], ""]
    if command:
        body += ["## Training command", "", "```bash", command, "```", ""]
    if metrics:
        body += ["## Metrics (from the run's logs.jsonl)", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        body.append("")
    body += ["## Files", "", *[f"- `{f}`" for f in files], ""]
    body += _usage(base_model, files)
    return "\n".join(header + body)


def _library(files: list[str]) -> str:
    """library_name: peft for an adapter (the hubs then show it as one), gguf / transformers otherwise."""
    if any(f.endswith(".gguf") for f in files):
        return "gguf"
    return "peft" if "adapter_config.json" in files else "transformers"


def _hub_dataset(spec: str) -> str | None:
    """A data set's hub id for the card's header: a catalogue entry's id; None for a local file."""
    try:
        from deltatune.data.catalog import get_dataset_spec

        entry = get_dataset_spec(spec.split("#")[0])
    except Exception:  # noqa: BLE001 - not a catalogue name
        return None
    return getattr(entry, "hf_id", None) or getattr(entry, "ms_id", None)


def _usage(base_model: str | None, files: list[str]) -> list[str]:
    if "adapter_config.json" in files:
        return [
            "## Use", "", "```python", "import deltatune as dt", "from transformers import AutoModelForCausalLM", "",
            f"base = AutoModelForCausalLM.from_pretrained({base_model!r})",
            'model = dt.TunedModel.from_pretrained(base, "REPO")  # or peft.PeftModel.from_pretrained', "```", "",
        ]  # fmt: skip
    ggufs = [f for f in files if f.endswith(".gguf")]
    if ggufs:
        lines = ["## Use", "", "```bash", f"llama-cli -m {ggufs[0]} -cnv"]
        if "Modelfile" in files:
            lines.append("ollama create my-model -f Modelfile && ollama run my-model")
        return lines + ["```", ""]
    return []
