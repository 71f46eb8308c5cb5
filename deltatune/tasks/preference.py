"""Pairwise preference training: DPO (sigmoid / hinge / ipo), IPO, ORPO, SimPO and CPO.

Rows are `{"prompt": [messages], "chosen": str, "rejected": str}` (deltatune/data/preference.py
converts the public shapes). Each pair is tokenized twice with the chat template, only the answer
and its end-of-turn supervised. A batch of B pairs is one forward of 2B rows (chosen first), and
sequence log-probs come from the chunked path over supervised tokens only
(`deltatune.ops.sequence_logps`): no (2B, T, V) fp32 logits.

Reference (DPO, IPO): the same weights with the adapter disabled (zero extra weight memory), or
with `--ref-adapter FOLDER` another adapter loaded frozen beside the trained one; its log-probs are
computed in the same step without gradients. ORPO, SimPO and CPO need no reference.

Losses follow TRL (trl 1.16 DPOTrainer._compute_loss, experimental CPOTrainer / ORPOTrainer) and
the tests check loss and gradients against TRL's code on tiny models:
- dpo sigmoid: -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), hinge: relu(1 - beta * delta),
  ipo: ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2 (per-token averages, as TRL).
- orpo: NLL of chosen (token mean) - beta * logsigmoid(log odds(avg logp_c) - log odds(avg logp_r)).
- simpo: -logsigmoid(beta * (avg logp_c - avg logp_r) - gamma), gamma = method_args simpo_gamma (0.5).
- cpo: -logsigmoid(beta * (logp_c - logp_r)) + cpo_alpha * NLL of chosen (token mean; cpo_alpha 1.0).

The loop normalises by units = pairs, so k micro-batches of b pairs give the mean over k*b pairs,
as TRL's gradient accumulation does (the NLL terms are token means per micro-batch, as in TRL).
Held-out metrics: reward accuracy (chosen reward > rejected reward), reward margin, loss.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.config import ConfigError
from deltatune.tasks.base import Log, TaskData, batched, to_device
from deltatune.tasks.causal_lm import CausalLMTask

DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0, "cpo": 0.1, "kto": 0.1}
LOSS_TYPES = {"dpo": ("sigmoid", "hinge", "ipo"), "ipo": ("ipo",), "cpo": ("sigmoid", "hinge", "ipo")}
METHOD_ARGS = {"simpo_gamma": 0.5, "cpo_alpha": 1.0, "desirable_weight": 1.0, "undesirable_weight": 1.0}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class PreferenceTask(CausalLMTask):
    """Shared data, reference handling and metrics; subclasses set `name` and the loss."""

    name = "dpo"
    uses_reference = True
    supports_packing = False  # a pair is its own pair of rows
    length = None  # no --group/--split-by-length: a pair is two rows, and ORPO/CPO's NLL is a per-batch token mean

    def __init__(self) -> None:
        super().__init__()
        self.beta = DEFAULT_BETA.get(self.name, 0.1)
        self.loss_type = LOSS_TYPES.get(self.name, ("sigmoid",))[0]
        self.options = dict(METHOD_ARGS)
        self.ref_adapter: str | None = None
        self._ref_loaded = False

    # -- arguments ----------------------------------------------------------------------------------
    def check_args(self, args: Any) -> None:
        beta = getattr(args, "beta", None)
        if beta is not None:
            if not (isinstance(beta, (int, float)) and beta > 0):
                raise ConfigError(f"--beta must be > 0, got {beta!r}")
            self.beta = float(beta)
        loss_type = getattr(args, "loss_type", None)
        allowed = LOSS_TYPES.get(self.name, ("sigmoid",))
        if loss_type is not None:
            if loss_type not in allowed:
                raise ConfigError(f"--loss-type for {self.name} must be one of {', '.join(allowed)}, got {loss_type!r}")
            self.loss_type = loss_type
        for key, value in (getattr(args, "method_args", None) or {}).items():
            if key not in METHOD_ARGS:
                raise ConfigError(f"unknown --method-args key {key!r}; known: {', '.join(METHOD_ARGS)}")
            try:
                self.options[key] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"--method-args {key} must be a number, got {value!r}") from None
        self.ref_adapter = getattr(args, "ref_adapter", None)
        if self.ref_adapter and not self.uses_reference:
            raise ConfigError(f"--ref-adapter: {self.name} uses no reference model; drop the flag")

    def structural(self) -> dict[str, Any]:
        """A resumed run must keep the method and its loss settings (they change every gradient)."""
        return {**super().structural(), "method": self.name, "beta": self.beta, "loss_type": self.loss_type,
                "method_args": self.options, "ref_adapter": self.ref_adapter}  # fmt: skip

    # -- data ---------------------------------------------------------------------------------------
    def prepare_data(self, args: Any, processor: Any, log: Log) -> TaskData:
        from deltatune.data import DataError, load_rows
        from deltatune.data.preference import encode_pairs
        from deltatune.train.data import split_rows

        rows, report = load_rows(args.dataset, seed=args.seed, max_bad_fraction=args.max_bad_fraction)
        log(report.summary())
        if rows and "chosen" not in rows[0]:
            raise DataError(
                f"{args.dataset}: {self.name} needs preference rows (prompt or messages, chosen, rejected); "
                "e.g. --dataset chatterbot-pref-en"
            )
        train_rows, val_rows = split_rows(rows, args.val_size, args.seed, log)
        train, enc_report = encode_pairs(processor, train_rows, args.max_length)
        log(enc_report.summary())
        enc_report.check(args.max_bad_fraction)
        val, _ = encode_pairs(processor, val_rows, args.max_length) if val_rows else ([], None)
        prompts = [r["prompt"] for r in val_rows[: args.num_samples]]
        references = [r["chosen"] for r in val_rows[: args.num_samples]]
        return TaskData(train, val, extra={"prompts": prompts, "references": references})

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """B pairs -> 2B right-padded rows, the chosen answers first."""
        from deltatune.data import collate

        return collate([e["chosen"] for e in examples] + [e["rejected"] for e in examples], self.pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    # -- log-probs ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reference(self, model: nn.Module):
        """The reference policy: the adapter disabled, or the frozen --ref-adapter."""
        tuned = getattr(model, "module", model)
        if not self.ref_adapter:
            with tuned.disable_adapter():
                yield
            return
        if not self._ref_loaded:
            tuned.load_adapter(self.ref_adapter, adapter_name="reference", is_trainable=False)
            self._ref_loaded = True
        active = list(tuned.active_adapters)
        tuned.set_adapter("reference")
        try:
            yield
        finally:
            tuned.set_adapter(active if len(active) > 1 else active[0])

    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token log-probs (2B, T-1), supervised mask) of the batch's answers."""
        from deltatune.ops.sequence_logps import token_logps

        return token_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])

    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), self.reference(model):
            logps, _ = self.logps(model, batch)
        return logps.sum(1)

    # -- loss ---------------------------------------------------------------------------------------
    def pair_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-pair losses (B,), {"chosen_rewards", "rejected_rewards"} detached)."""
        token, mask = self.logps(model, batch)
        counts = mask.sum(1).clamp(min=1)
        logps = token.sum(1)
        pairs = logps.shape[0] // 2
        ref = self.reference_logps(model, batch) if self.uses_reference else None
        losses, rewards = self.loss_from_logps(logps, counts, ref, token[:pairs], mask[:pairs])
        return losses, rewards

    def loss_from_logps(self, logps, counts, ref, chosen_tokens, chosen_mask):
        pairs = logps.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        n_c, n_r = counts[:pairs], counts[pairs:]
        beta = self.beta
        if self.name in ("dpo", "ipo"):
            ref_c, ref_r = ref[:pairs], ref[pairs:]
            ratio_c, ratio_r = chosen - ref_c, rejected - ref_r
            delta = ratio_c - ratio_r
            if self.loss_type == "sigmoid":
                losses = -F.logsigmoid(beta * delta)
            elif self.loss_type == "hinge":
                losses = torch.relu(1 - beta * delta)
            else:  # ipo (per-token averages of the log ratios, as TRL)
                losses = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
            return losses, {"chosen": (beta * ratio_c).detach(), "rejected": (beta * ratio_r).detach()}
        nll = -(chosen_tokens * chosen_mask).sum() / chosen_mask.sum().clamp(min=1)  # token mean of this batch
        if self.name == "orpo":
            avg_c, avg_r = (chosen / n_c).float(), (rejected / n_r).float()
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            losses = nll - beta * F.logsigmoid(log_odds)
            return losses, {"chosen": (beta * avg_c).detach(), "rejected": (beta * avg_r).detach()}
        if self.name == "simpo":
            avg_c, avg_r = chosen / n_c, rejected / n_r
            logits = (avg_c - avg_r) - self.options["simpo_gamma"] / beta
            losses = -F.logsigmoid(beta * logits)
            return losses, {"chosen": (beta * avg_c).detach(), "rejected": (beta * avg_r).detach()}
        # cpo
        logits = chosen - rejected
        if self.loss_type == "sigmoid":
            losses = -F.logsigmoid(beta * logits)
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - beta * logits)
        else:
            losses = (logits - 1 / (2 * beta)) ** 2
        losses = losses + self.options["cpo_alpha"] * nll
        return losses, {"chosen": (beta * chosen).detach(), "rejected": (beta * rejected).detach()}

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses, _ = self.pair_losses(model, batch)
        return losses.sum()

    # -- metrics ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        if not data.val:
            return None
        was_training = model.training
        model.eval()
        right = margin = loss = 0.0
        try:
            for part in batched(data.val, args.batch_size):
                batch = to_device(self.collate(part), device)
                losses, rewards = self.pair_losses(model, batch)
                right += float((rewards["chosen"] > rewards["rejected"]).float().sum())
                margin += float((rewards["chosen"] - rewards["rejected"]).sum())
                loss += float(losses.sum())
        finally:
            model.train(was_training)
        n = len(data.val)
        return {"reward_accuracy": right / n, "reward_margin": margin / n, "loss": loss / n, "pairs": n}


class DPOTask(PreferenceTask):
    name = "dpo"


class IPOTask(PreferenceTask):
    name = "ipo"


class ORPOTask(PreferenceTask):
    name = "orpo"
    uses_reference = False


class SimPOTask(PreferenceTask):
    name = "simpo"
    uses_reference = False


class CPOTask(PreferenceTask):
    name = "cpo"
    uses_reference = False
