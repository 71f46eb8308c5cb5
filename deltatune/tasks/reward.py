"""rm: a reward model, a one-output sequence-classification head on the (adapted) decoder.

Rows are preference pairs (`deltatune/data/preference.py`). Each answer is rendered with the chat
template after its prompt; the head reads the last real token (transformers' sequence
classification for decoders). Chosen and rejected go through one forward of 2B rows. Loss per pair,
as TRL's RewardTrainer: -logsigmoid(r_chosen - r_rejected), optionally + center_rewards *
(r_chosen + r_rejected)^2 (--method-args center_rewards=0.01); the loop averages over pairs. With
task_type SEQ_CLS the new `score` head trains in full beside the adapter.
Held-out metrics: accuracy (r_chosen > r_rejected), mean margin, loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.tasks.base import Log, TaskData, batched, to_device
from deltatune.tasks.preference import PreferenceTask


class RewardModelTask(PreferenceTask):
    name = "rm"
    task_type = "SEQ_CLS"
    uses_reference = False
    center = 0.0

    def check_args(self, args: Any) -> None:
        from deltatune.core.config import ConfigError

        extra = dict(getattr(args, "method_args", None) or {})
        self.center = float(extra.pop("center_rewards", 0.0))
        if getattr(args, "beta", None) is not None or getattr(args, "loss_type", None) is not None:
            raise ConfigError("--method rm takes no --beta / --loss-type (the loss is -logsigmoid(r_c - r_r))")
        if extra:
            raise ConfigError(f"unknown --method-args key {next(iter(extra))!r} for rm; known: center_rewards")
        if getattr(args, "ref_adapter", None):
            raise ConfigError("--ref-adapter: rm uses no reference model; drop the flag")

    def structural(self) -> dict[str, Any]:
        return {**super().structural(), "center_rewards": self.center}

    def load_model(self, args: Any, data: TaskData, log: Log = print) -> nn.Module:
        from deltatune.tasks.sequence_classification import load_classifier

        model = load_classifier("AutoModelForSequenceClassification", self._source(args, log), ["reward"], args,
                                self.pad_id)  # fmt: skip
        model.config.pad_token_id = self.pad_id
        return model

    def tuner_defaults(self, args: Any, model: nn.Module, model_spec: Any) -> dict[str, Any]:
        return {**super().tuner_defaults(args, model, model_spec), "task_type": self.task_type}

    def rewards(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits.squeeze(-1).float()  # (2B,)

    def pair_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        rewards = self.rewards(model, batch)
        chosen, rejected = rewards.chunk(2)
        losses = -F.logsigmoid(chosen - rejected)
        if self.center:
            losses = losses + self.center * (chosen + rejected) ** 2
        return losses, {"chosen": chosen.detach(), "rejected": rejected.detach()}

    def samples(self, *args: Any, **kwargs: Any) -> list:
        return []  # a reward model does not generate

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        if not data.val:
            return None
        was_training = model.training
        model.eval()
        right = margin = loss = 0.0
        try:
            for part in batched(data.val, args.batch_size):
                losses, r = self.pair_losses(model, to_device(self.collate(part), device))
                right += float((r["chosen"] > r["rejected"]).float().sum())
                margin += float((r["chosen"] - r["rejected"]).sum())
                loss += float(losses.sum())
        finally:
            model.train(was_training)
        n = len(data.val)
        return {"accuracy": right / n, "margin": margin / n, "loss": loss / n, "pairs": n}
