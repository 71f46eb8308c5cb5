"""TrainArgs: every knob of `deltatune sft`, documented once (the docstrings are the CLI help).

The defaults are the embedded demo: SmolLM2-135M-Instruct + LoRA (r 8 on q_proj/v_proj) on the
de-duplicated English chatterbot pairs, about three minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from deltatune.core.config import ConfigError
from deltatune.tasks.registry import task_names

SCHEDULERS = ("cosine", "linear", "constant")
TASKS = task_names()


@dataclass(kw_only=True)
class TrainArgs:
    """Arguments of one fine-tuning run (`deltatune.train.train(TrainArgs(...))`)."""

    task: str = "causal-lm"
    """What to fine-tune for (deltatune/tasks/registry.py): causal-lm (chat/instruction data), pretrain (raw text),
    sequence-classification, token-classification, seq2seq, image-classification, text-to-image, image-to-text."""
    model: str = "smollm2-135m-instruct"
    """Base model: a registry name (`deltatune models`), a local folder, or a hub id."""
    dataset: str = "chatterbot-en"
    """Dataset spec: catalogue names or local files, comma-separated, each optionally NAME#N."""
    tuner: str = "lora"
    """Tuner registry name."""
    tuner_args: dict[str, Any] = field(default_factory=dict)
    """Fields of the tuner's config (KEY=VALUE,...); unset ones take the tuner's defaults (LoRA: r=8,
    lora_alpha=16) and target_modules the model's registry entry."""
    output_dir: str | None = None
    """Run folder (checkpoints, logs, adapter); default runs/<model>-<tuner>-<time>."""
    max_steps: int | None = 90
    """Optimizer steps to run (exclusive with num_epochs)."""
    num_epochs: float | None = None
    """Passes over the training rows (exclusive with max_steps)."""
    batch_size: int = 8
    """Rows per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (the loss is normalized over all their tokens)."""
    lr: float = 2e-3
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming the learning rate up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay on trainable tensors."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: learning rate of lora_B tensors = ratio * lr (e.g. 16)."""
    seed: int = 42
    """Seeds the adapter init, the data split, the sampling and the shuffling."""
    max_length: int = 96
    """Tokens per row after truncation (the answer's end-of-turn token is always kept)."""
    split_by_length: bool = True
    """Cut each batch in two by length and accumulate (same rows, same update, less padding)."""
    group_by_length: bool = False
    """Batch rows of similar length together (much less padding; changes which rows share a step)."""
    max_bad_fraction: float = 0.5
    """Largest share of invalid rows a data source may have (they are skipped and counted); above it the
    run stops with the per-reason report. 0: any invalid row stops the run."""
    val_size: float | None = None
    """Held-out rows: a count >= 1 or a fraction in (0, 1); 0 disables evaluation. Unset: 200 rows,
    at most a fifth of the data (the run says what it chose)."""
    save_steps: int = 50
    """Write a checkpoint every N steps (and always at the end)."""
    save_total_limit: int = 2
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    eval_steps: int | None = None
    """Evaluate the task's held-out metrics every N steps (always before and after training)."""
    packing: bool = False
    """causal-lm / pretrain: concatenate examples into rows of max_length tokens; attention and positions
    restart per example (no cross-contamination), far less padding."""
    report_to: str | None = None
    """Also send metrics to tensorboard, wandb or mlflow (accelerate trackers); logs.jsonl and loss.png stay."""
    resume: str | bool = False
    """Continue from the newest valid checkpoint (of output_dir, or of the given run/checkpoint folder)."""
    allow_changes: bool = False
    """With --resume: accept changed learning rate, schedule, warmup, clipping, weight decay or a shorter
    run (the differences are printed). A longer run (--max-steps up) needs no flag."""
    overwrite: bool = False
    """Delete an existing run in output_dir and start over."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (adapter gradients stay non-zero)."""
    dtype: str = "fp32"
    """Base weight dtype: fp32, bf16 or fp16 (adapters stay fp32; bf16/fp16 autocast)."""
    quantize: str | None = None
    """Load the base in 4bit (NF4) or 8bit with bitsandbytes (QLoRA)."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run. Only the command-line flag turns it on."""
    distributed: str | None = None
    """Multi-process strategy under accelerate launch / torchrun: ddp, fsdp (FSDP2, adapters in their own units),
    deepspeed-zero2 or deepspeed-zero3 (docs/distributed.md). Unset: ddp when launched on several processes."""
    accelerate_config: str | None = None
    """An `accelerate config` file whose distributed_type (MULTI_GPU, FSDP with fsdp_version 2, DEEPSPEED stage 2/3)
    sets --distributed."""
    num_samples: int = 2
    """Held-out prompts answered before and after training (greedy)."""
    max_new_tokens: int = 40
    """Length limit of those sample answers."""
    nan_patience: int = 3
    """Stop after this many consecutive steps with non-finite loss or gradients."""
    grad_check_steps: int = 3
    """Within the first N steps every trainable tensor must get a finite, non-zero gradient."""
    plot: bool = True
    """Write loss.png at the end."""
    progress: bool = True
    """Show a progress bar."""
    beta: float | None = None
    """rlhf: weight of the preference term (dpo/ipo/kto: KL strength 0.1; orpo: odds-ratio weight 0.1;
    simpo 2.0; cpo 0.1)."""
    loss_type: str | None = None
    """rlhf: loss variant; dpo: sigmoid (default), hinge or ipo; cpo: sigmoid, hinge or ipo."""
    ref_adapter: str | None = None
    """rlhf (dpo/ipo/kto): reference = this adapter folder, loaded frozen (e.g. the SFT adapter); default:
    the base model (the trained adapter disabled, no extra weights)."""
    num_generations: int = 4
    """rlhf grpo: completions sampled per prompt (a group; advantages are relative to its mean)."""
    reward: str | None = None
    """rlhf grpo: reward functions, comma-separated and summed: exact, format, length, or module.path:function
    (default exact)."""
    method_args: dict[str, Any] = field(default_factory=dict)
    """rlhf: method constants KEY=VALUE,...: simpo_gamma (0.5), cpo_alpha (1.0), desirable_weight and
    undesirable_weight (kto, 1.0), center_rewards (rm, 0); grpo: max_completion_length (32), temperature (1.0),
    epsilon (0.2), format_regex."""

    # ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid value (before any model or data loads)."""
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if (self.max_steps is None) == (self.num_epochs is None):
            raise ConfigError("give exactly one of max_steps and num_epochs")
        _positive(self, "max_steps", int, allow_none=True)
        if self.num_epochs is not None and not (isinstance(self.num_epochs, (int, float)) and self.num_epochs > 0):
            raise ConfigError(f"num_epochs must be > 0, got {self.num_epochs!r}")
        for name in ("batch_size", "grad_accum", "max_length", "save_steps", "save_total_limit", "nan_patience"):
            _positive(self, name, int)
        _positive(self, "eval_steps", int, allow_none=True)
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 10):
            raise ConfigError(f"lr must be in (0, 10), got {self.lr!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("max_grad_norm and weight_decay must be >= 0")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise ConfigError(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio!r}")
        if self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8, got {self.max_length}")
        if not (isinstance(self.max_bad_fraction, (int, float)) and 0 <= self.max_bad_fraction <= 1):
            raise ConfigError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction!r}")
        if self.val_size is not None and not (
            self.val_size == 0 or 0 < self.val_size < 1 or (self.val_size >= 1 and self.val_size == int(self.val_size))
        ):
            raise ConfigError(f"val_size must be 0, a fraction in (0, 1) or a row count, got {self.val_size!r}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.quantize not in (None, "4bit", "8bit"):
            raise ConfigError(f"quantize must be 4bit or 8bit, got {self.quantize!r}")
        if not isinstance(self.tuner_args, dict):
            raise ConfigError(f"tuner_args must be a mapping, got {type(self.tuner_args).__name__}")
        if self.report_to not in (None, "tensorboard", "wandb", "mlflow"):
            raise ConfigError(f"report_to must be tensorboard, wandb or mlflow, got {self.report_to!r}")
        if self.distributed is not None:
            from deltatune.train.distributed import check_mode

            check_mode(self.distributed)
        if self.overwrite and self.resume:
            raise ConfigError("--resume and --overwrite exclude each other; pick one")

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.num_epochs * steps_per_epoch))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "config") -> TrainArgs:
        """Build from a config file's mapping; unknown keys and trust_remote_code are refused."""
        return cls().updated(data, source=source)

    def updated(self, data: dict[str, Any], *, source: str = "config") -> TrainArgs:
        """A copy with keys of `data` (names as fields, '-' accepted for '_') set."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        known = {f.name for f in fields(self)}
        changes = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(changes) - known)
        if unknown:
            from deltatune.suggest import did_you_mean

            hint = did_you_mean(unknown[0], known)
            raise ConfigError(f"{source}: unknown keys {unknown}; {hint}valid keys: {', '.join(sorted(known))}")
        if changes.get("trust_remote_code"):
            raise ConfigError(f"{source}: trust_remote_code cannot be set from a file; pass --trust-remote-code")
        return dataclasses.replace(self, **changes)


def _positive(args: TrainArgs, name: str, kind: type, *, allow_none: bool = False) -> None:
    value = getattr(args, name)
    if value is None and allow_none:
        return
    if not isinstance(value, kind) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def stable_hash(data: Any) -> str:
    """sha256 of canonical JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
