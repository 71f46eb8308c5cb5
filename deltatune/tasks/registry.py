"""Task name -> the class that implements it (`deltatune sft --task NAME`).

The one table edited to add a task. Classes are imported on first use, so listing names (for
`--help` and argument validation) imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

TASKS: dict[str, str] = {
    "causal-lm": "deltatune.tasks.causal_lm:CausalLMTask",
    "pretrain": "deltatune.tasks.pretrain:PretrainTask",
    "sequence-classification": "deltatune.tasks.sequence_classification:SequenceClassificationTask",
    "token-classification": "deltatune.tasks.token_classification:TokenClassificationTask",
    "seq2seq": "deltatune.tasks.seq2seq:Seq2SeqTask",
    "image-classification": "deltatune.tasks.image_classification:ImageClassificationTask",
    "text-to-image": "deltatune.tasks.text_to_image:TextToImageTask",
    "dpo": "deltatune.tasks.preference:DPOTask",  # `deltatune rlhf --method ...` (preference and RL training)
    "ipo": "deltatune.tasks.preference:IPOTask",
    "orpo": "deltatune.tasks.preference:ORPOTask",
    "simpo": "deltatune.tasks.preference:SimPOTask",
    "cpo": "deltatune.tasks.preference:CPOTask",
    "kto": "deltatune.tasks.kto:KTOTask",
    "rm": "deltatune.tasks.reward:RewardModelTask",
    "grpo": "deltatune.tasks.grpo:GRPOTask",
    "image-to-text": "deltatune.tasks.image_to_text:ImageToTextTask",
}


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def get_task(name: str) -> Any:
    """A fresh instance of task `name` (one per run: tasks keep run state).

    Raises:
        ConfigError: unknown task (listing the known ones).
    """
    if name not in TASKS:
        from deltatune.core.config import ConfigError

        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
