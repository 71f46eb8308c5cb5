"""Command lines the web UI runs, the subprocesses running them, and the run folders they write.

Every form becomes a `deltatune` argv list through the same flag table the CLI parses
(deltatune.cli.main._SFT_FLAGS), so the command shown in the page is exactly what runs, and a
run's `run.json` turns back into the command that resumes it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

DELTATUNE = [sys.executable, "-m", "deltatune.cli.main"]
"""How commands start: this interpreter's deltatune (shown to the user as `deltatune ...`)."""


def shown(argv: list[str]) -> str:
    """The copyable shell line for an argv list (`deltatune` instead of the interpreter path)."""
    return shlex.join(["deltatune", *argv])


# -- tuner fields ---------------------------------------------------------------------------------
def _text(value: Any) -> str:
    """A config value as `--tuner-args` writes it (lists as [a,b], no quotes)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value)
    return "" if value is None else str(value)


TARGETS_NOTE = "Empty: the model registry's targets for this tuner, else every linear layer (all-linear)."


def tuner_fields(tuner: str) -> list[list[str]]:
    """[field, default, help] for every field of the tuner's config class (help = its docstring); the
    default is what `deltatune sft` fills in when --tuner-args leaves the field unset (the tuner's
    run defaults, e.g. LoRA's lora_alpha=16); target_modules stays empty (the model decides)."""
    from deltatune.core.config import TunerConfig, field_docs
    from deltatune.core.registry import get_spec

    config = get_spec(tuner).config
    docs = field_docs(config)
    overrides = dict(config.run_defaults)
    skipped = {f.name for f in fields(TunerConfig)} - {"target_modules", "modules_to_save", "exclude_modules"}
    rows = []
    for f in fields(config):
        if f.name in skipped or not f.init:
            continue
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else None)
        )
        default = overrides.get(f.name, default)
        help_ = " ".join(docs.get(f.name, "").split())
        rows.append([f.name, _text(default), f"{TARGETS_NOTE} {help_}" if f.name == "target_modules" else help_])
    return rows


def tuner_args(rows: list[list[Any]], tuner: str, extra: str = "") -> str:
    """`--tuner-args` text: the table's fields whose value differs from the run's default, then
    `extra` (whose keys win over the table's)."""
    from deltatune.cli.parsing import parse_tuner_args

    defaults = {name: default for name, default, _ in tuner_fields(tuner)}
    try:
        in_extra = set(parse_tuner_args(extra)) if extra.strip() else set()
    except Exception:  # noqa: BLE001 - a half-typed box; the command shows it and the CLI explains
        in_extra = set()
    parts = []
    for row in rows or []:
        if len(row) < 2:
            continue
        name, value = str(row[0]).strip(), str(row[1] if row[1] is not None else "").strip()
        if name in defaults and value != defaults[name] and value != "" and name not in in_extra:
            parts.append(f"{name}={value}")
    if extra.strip():
        parts.append(extra.strip())
    return ",".join(parts)


# -- command lines --------------------------------------------------------------------------------
def sft_argv(args: dict[str, Any]) -> list[str]:
    """`sft` argv from TrainArgs field values; None and False are left out (the CLI's default)."""
    from deltatune.cli.main import _SFT_FLAGS

    argv = ["sft"]
    if args.get("max_steps") is not None:
        argv += ["--max-steps", _text(args["max_steps"])]
    elif args.get("num_epochs") is not None:
        argv += ["--num-epochs", _text(args["num_epochs"])]
    for flag, name, options in _SFT_FLAGS:
        value = args.get(name)
        if value is None or value == "" or value == {}:
            continue
        action = options.get("action")
        if name == "resume":
            if value:
                argv.append(flag)
        elif action == "store_true":
            if value:
                argv.append(flag)
        elif action is not None:  # BooleanOptionalAction
            argv.append(flag if value else "--no-" + flag[2:])
        elif name == "tuner_args":
            text = value if isinstance(value, str) else ",".join(f"{k}={_text(v)}" for k, v in value.items())
            if text:
                argv += [flag, text]
        else:
            argv += [flag, _text(value)]
    return argv


def resume_argv(run_dir: Path) -> list[str]:
    """The command that resumes `run_dir`: its own arguments (run.json) plus --resume."""
    from deltatune.train.args import TrainArgs

    saved = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))["args"]
    defaults = {f.name: getattr(TrainArgs(), f.name) for f in fields(TrainArgs)}
    changed = {
        k: v for k, v in saved.items() if k in ("model", "dataset", "output_dir", "max_steps") or v != defaults.get(k)
    }
    changed.update(output_dir=str(run_dir), resume=True, overwrite=False)
    if changed.get("max_steps") is None:
        changed.pop("max_steps", None)
    return sft_argv(changed)


def inspect_argv(model: str, tuner: str, tuner_args_text: str) -> list[str]:
    argv = ["inspect", "--model", model, "--tuner", tuner]
    return argv + (["--tuner-args", tuner_args_text] if tuner_args_text else [])


def eval_argv(model: str, adapter: str, dataset: str, max_length: int, generate: int) -> list[str]:
    argv = ["eval", "--model", model]
    argv += ["--adapter", adapter] if adapter else []
    return argv + ["--dataset", dataset, "--max-length", str(int(max_length)), "--generate", str(int(generate))]


def export_argv(
    model: str, adapter: str, output_dir: str, kind: str, overwrite: bool, gguf_type: str = "", ollama: bool = False,
    push_to_hub: str = "", hub: str = "huggingface", private: bool = False, dry_run: bool = False,
) -> list[str]:  # fmt: skip
    """kind: "adapter" (cleaned PEFT folder), "merge", "gguf", "gguf-lora"; the GGUF fields apply to the GGUF
    kinds only, the hub fields only when `push_to_hub` names a repository."""
    argv = ["export", "--model", model, "--adapter", adapter, "--output-dir", output_dir]
    if kind == "merge":
        argv.append("--merge")
    elif kind in ("gguf", "gguf-lora"):
        argv += ["--to", kind]
        argv += ["--gguf-type", gguf_type] if gguf_type else []
        argv += ["--ollama"] if ollama else []
    argv += ["--overwrite"] if overwrite else []
    if push_to_hub.strip():
        argv += ["--push-to-hub", push_to_hub.strip(), "--hub", hub or "huggingface"]
        argv += ["--private"] if private else []
        argv += ["--dry-run"] if dry_run else []
    return argv


# -- running commands -----------------------------------------------------------------------------
@dataclass
class Job:
    """One `deltatune` subprocess and its console output (stdout and stderr together)."""

    argv: list[str]
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)

    def read(self) -> str:
        return "".join(self.output)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM: the training loop writes a checkpoint, then exits (status 10)."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)


def start(argv: list[str], *, env: dict[str, str] | None = None) -> Job:
    """Run `deltatune <argv>` (no shell); its output is collected by a reader thread."""
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        [*DELTATUNE, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=environ, text=True, errors="replace", bufsize=1,
    )  # fmt: skip
    job = Job(argv, process)

    def pump() -> None:
        for line in process.stdout:
            # progress bars redraw with \r; keep the last state of each line
            job.output.append(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r\n") else line)
            del job.output[:-400]

    threading.Thread(target=pump, daemon=True).start()
    return job


def run(argv: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run `deltatune <argv>` to the end: (exit status, output)."""
    done = subprocess.run(
        [*DELTATUNE, *argv], capture_output=True, text=True, errors="replace", timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return done.returncode, (done.stdout + done.stderr).strip()


def check_data(spec: str, max_bad_fraction: float = 0.5) -> str:
    """The data validation report `deltatune sft` prints, or its one-line error (same function, same text)."""
    from deltatune.cli.errors import describe
    from deltatune.data import load_rows

    try:
        _, report = load_rows(spec, max_bad_fraction=max_bad_fraction)
    except Exception as err:  # noqa: BLE001 - shown in the page as the CLI shows it
        return f"deltatune: {describe(err)}"
    return report.summary()


# -- run folders ----------------------------------------------------------------------------------
def read_logs(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "logs.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return records


def _lock_holder_alive(run_dir: Path) -> bool:
    lock = Path(run_dir) / ".lock"
    try:
        text = lock.read_text().split()
        pid = int(text[1]) if len(text) == 2 and text[0] == "pid" else 0
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return "deltatune" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True


def run_status(run_dir: Path) -> dict[str, Any]:
    """{run, status, step, max_steps, last_loss}: status is running, finished, interrupted (resumable)
    or incomplete (no verified checkpoint: start again), from the lock, the final adapter and the
    checkpoint manifests."""
    from deltatune.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    try:
        saved = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["args"]
    except (OSError, ValueError, KeyError):
        saved = {}
    latest = (
        ckpt.find_latest(run_dir / "checkpoints", log=lambda *_: None) if (run_dir / "checkpoints").is_dir() else None
    )
    step = latest[1]["step"] if latest else 0
    losses = [r["loss"] for r in read_logs(run_dir) if r.get("event") == "train"]
    if _lock_holder_alive(run_dir):
        status = "running"
    elif (
        (run_dir / "adapter" / "adapter_config.json").exists()
        and latest is not None
        and (saved.get("max_steps") is None or step >= saved["max_steps"])
    ):
        status = "finished"
    elif latest is not None:
        status = "interrupted (resumable)"
    else:
        status = "incomplete"
    return {"run": str(run_dir), "status": status, "step": step, "max_steps": saved.get("max_steps"),
            "last_loss": round(losses[-1], 4) if losses else None}  # fmt: skip


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Run folders (with a run.json) directly under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / "run.json").exists()]
    runs.sort(key=lambda p: (p / "run.json").stat().st_mtime, reverse=True)
    return [run_status(p) for p in runs]
