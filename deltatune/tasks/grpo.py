"""GRPO: group-relative policy optimisation with in-process rollouts and Python reward functions.

Rows are prompt-only (`{"prompt": [messages], "answer": str | None}`; e.g. the offline
`arithmetic-prompts`). Each step, for every prompt of the micro-batch, the policy (adapter on,
KV cache on) samples `--num-generations` completions of at most `max_completion_length` tokens
(method args; temperature `temperature`). Rewards come from the functions named by `--reward`
(comma-separated, summed): built-ins

- `exact`:  1 when the completion's last number (or, for non-numeric answers, its stripped text)
            equals the row's answer, else 0 (a regex answer checker);
- `format`: 1 when the whole completion matches `format_regex` (method args; default: a bare
            number), else 0;
- `length`: -(completion tokens) / max_completion_length (a length penalty);

or `module.path:function` (your callable `f(completions: list[str], answers: list[str | None]) ->
list[float]`; importing it runs your code, so name only code you trust).

Advantages are group-normalised: (r - mean of the prompt's group) / (std of the group + 1e-4),
std with Bessel's correction, as TRL (scale_rewards "group"). The loss is TRL's GRPO objective
(trl 1.16 GRPOTrainer._compute_loss, loss_type "grpo", token-level importance sampling, one
update per generation so old log-probs = the current ones, detached):

    per_token = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + beta * (exp(ref - logp) - (ref - logp) - 1)

averaged over each completion's tokens, then over completions (units = completions). The
reference is the adapter disabled (or --ref-adapter). Log-probs come from the chunked
supervised-token path. The sampling uses torch's global generator, which checkpoints save and
--resume restores, so a resumed run draws the same rollouts (exact resume).
Held-out metric: mean reward of greedy completions.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.core.config import ConfigError
from deltatune.tasks.base import Log, TaskData, batched
from deltatune.tasks.preference import PreferenceTask

GRPO_ARGS = {"max_completion_length": 32, "temperature": 1.0, "epsilon": 0.2, "format_regex": r"\s*-?\d+(\.\d+)?\s*"}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def grpo_token_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None, advantages: torch.Tensor,
    mask: torch.Tensor, *, beta: float, epsilon: float,
) -> torch.Tensor:  # fmt: skip
    """Per-completion GRPO losses (N,): the clipped surrogate plus beta * k3 KL, token-averaged."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    if beta != 0.0:
        diff = ref_logps - logps
        per_token = per_token + beta * (torch.exp(diff) - diff - 1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)  # unbiased, as TRL's nanstd
    return ((grouped - mean) / (std + 1e-4)).reshape(-1)


def _exact(completions: list[str], answers: list[str | None]) -> list[float]:
    out = []
    for text, answer in zip(completions, answers):
        if answer is None:
            out.append(0.0)
        elif _NUMBER.fullmatch(answer.strip()):
            numbers = _NUMBER.findall(text)
            out.append(float(bool(numbers) and float(numbers[-1]) == float(answer)))
        else:
            out.append(float(text.strip() == answer.strip()))
    return out


class GRPOTask(PreferenceTask):
    name = "grpo"

    def __init__(self) -> None:
        super().__init__()
        self.beta = 0.04
        self.grpo = dict(GRPO_ARGS)
        self.num_generations = 4
        self.reward_names = ["exact"]
        self.rewards: list[Callable] = []
        self.answers: list[str | None] = []
        self._step: dict[str, list[float]] = {}

    def check_args(self, args: Any) -> None:
        extra = dict(getattr(args, "method_args", None) or {})
        for key in list(extra):
            if key in GRPO_ARGS:
                value = extra.pop(key)
                self.grpo[key] = value if key == "format_regex" else type(GRPO_ARGS[key])(value)
        if args.beta is not None and not (isinstance(args.beta, (int, float)) and args.beta >= 0):
            raise ConfigError(f"--beta must be >= 0, got {args.beta!r}")
        if extra:
            raise ConfigError(
                f"unknown --method-args key {next(iter(extra))!r} for grpo; known: {', '.join(GRPO_ARGS)}"
            )
        if args.beta is not None:
            self.beta = float(args.beta)
        self.ref_adapter = getattr(args, "ref_adapter", None)
        self.num_generations = int(getattr(args, "num_generations", 4) or 4)
        if self.num_generations < 2:
            raise ConfigError(
                f"--num-generations must be >= 2 (advantages compare a group), got {self.num_generations}"
            )
        if getattr(args, "loss_type", None) not in (None, "grpo"):
            raise ConfigError(f"--loss-type for grpo must be grpo, got {args.loss_type!r}")
        if getattr(args, "packing", False):
            raise ConfigError("--packing does not apply to grpo")
        # Groups whose completions all score the same have zero advantage, so early steps may leave the
        # adapter without gradient by design: the engine's first-steps gradient check does not apply.
        args.grad_check_steps = 0
        self.reward_names = [r.strip() for r in (getattr(args, "reward", None) or "exact").split(",") if r.strip()]
        self.rewards = [self._reward(name) for name in self.reward_names]
        if self.grpo["max_completion_length"] < 1 or self.grpo["temperature"] <= 0:
            raise ConfigError("max_completion_length must be >= 1 and temperature > 0")

    def _reward(self, name: str) -> Callable:
        if name == "exact":
            return _exact
        if name == "format":
            pattern = re.compile(self.grpo["format_regex"])
            return lambda completions, answers: [float(bool(pattern.fullmatch(c))) for c in completions]
        if name == "length":
            return None  # computed from token counts in rollout()
        module, _, function = name.partition(":")
        if not function:
            raise ConfigError(f"--reward {name!r}: use exact, format, length or module.path:function")
        try:
            return getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"--reward {name!r}: cannot import it ({err}); check the module path") from None

    def structural(self) -> dict[str, Any]:
        return {**super().structural(), "grpo": self.grpo, "num_generations": self.num_generations,
                "reward": self.reward_names}  # fmt: skip

    # -- data ---------------------------------------------------------------------------------------
    def prepare_data(self, args: Any, processor: Any, log: Log) -> TaskData:
        from deltatune.data import DataError, load_rows
        from deltatune.data.templates import render_chat
        from deltatune.train.data import split_rows

        rows, report = load_rows(args.dataset, seed=args.seed, max_bad_fraction=args.max_bad_fraction)
        log(report.summary())
        if rows and ("answer" not in rows[0] or "chosen" in rows[0]):
            raise DataError(f"{args.dataset}: grpo needs prompt-only rows (prompt or messages, optional answer); "
                            "e.g. --dataset arithmetic-prompts")  # fmt: skip
        train_rows, val_rows = split_rows(rows, args.val_size, args.seed, log)

        def encode(part: list[dict]) -> list[dict]:
            out = []
            for row in part:
                text = render_chat(processor, row["prompt"], add_generation_prompt=True)
                ids = list(processor(text, add_special_tokens=False)["input_ids"])[-args.max_length :]
                out.append({"prompt_ids": ids, "index": len(self.answers)})
                self.answers.append(row["answer"])
            return out

        train, val = encode(train_rows), encode(val_rows)
        log(f"grpo: {len(train)} train / {len(val)} held-out prompts, {self.num_generations} completions each, "
            f"rewards {', '.join(self.reward_names)}")  # fmt: skip
        return TaskData(
            train,
            val,
            extra={
                "prompts": [r["prompt"] for r in val_rows[: args.num_samples]],
                "references": [r["answer"] or "" for r in val_rows[: args.num_samples]],
            },
        )

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Prompts left-padded (generation continues at the right edge) and their row indices."""
        width = max(len(e["prompt_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, width - len(e["prompt_ids"]) :] = torch.tensor(e["prompt_ids"])
            mask[i, width - len(e["prompt_ids"]) :] = 1
        return {"prompt_ids": ids, "prompt_mask": mask, "index": torch.tensor([e["index"] for e in examples])}

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["prompt_ids"].shape[0] * self.num_generations

    # -- rollouts -----------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, model: nn.Module, batch: dict[str, torch.Tensor], *, greedy: bool = False) -> dict[str, Any]:
        tuned = getattr(model, "module", model)
        group = 1 if greedy else self.num_generations
        ids = batch["prompt_ids"].repeat_interleave(group, 0)
        mask = batch["prompt_mask"].repeat_interleave(group, 0)
        eos = self.tokenizer.eos_token_id
        was_training = tuned.training
        tuned.eval()
        try:
            sampling = {"do_sample": False} if greedy else {
                "do_sample": True, "temperature": self.grpo["temperature"], "top_k": 0, "top_p": 1.0}  # fmt: skip
            out = tuned.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=int(self.grpo["max_completion_length"]),
                pad_token_id=self.pad_id, eos_token_id=eos, use_cache=True, **sampling,
            )  # fmt: skip
        finally:
            tuned.train(was_training)
        completion = out[:, ids.shape[1] :]
        ends = completion == eos
        first = torch.where(
            ends.any(1), ends.float().argmax(1), torch.full_like(ends[:, 0], completion.shape[1], dtype=torch.long)
        )
        cmask = torch.arange(completion.shape[1], device=completion.device)[None, :] <= first[:, None]  # up to EOS
        texts = self.tokenizer.batch_decode(completion.masked_fill(~cmask, self.pad_id), skip_special_tokens=True)
        answers = [self.answers[int(i)] for i in batch["index"].repeat_interleave(group, 0)]
        rewards = torch.zeros(len(texts), dtype=torch.float32, device=completion.device)
        for name, function in zip(self.reward_names, self.rewards):
            if name == "length":
                rewards -= cmask.sum(1).float() / float(self.grpo["max_completion_length"])
            else:
                rewards += torch.tensor([float(v) for v in function(texts, answers)], device=completion.device)
        return {"ids": ids, "mask": mask, "completion": completion, "cmask": cmask, "rewards": rewards, "texts": texts}

    def completion_logps(self, model: nn.Module, roll: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        from deltatune.ops.sequence_logps import token_logps

        full = torch.cat((roll["ids"], roll["completion"]), 1)
        attention = torch.cat((roll["mask"], roll["cmask"].long()), 1)
        labels = full.masked_fill(attention == 0, -100)
        labels[:, : roll["ids"].shape[1]] = -100
        logps, mask = token_logps(model, full, labels, attention)
        width = roll["completion"].shape[1]
        return logps[:, -width:], mask[:, -width:]

    def step_metrics(self) -> dict[str, float]:
        """Mean rollout reward (and completion length) of the step's micro-batches; reset per step."""
        rewards, lengths = self._step.pop("rewards", []), self._step.pop("lengths", [])
        if not rewards:
            return {}
        return {"reward": sum(rewards) / len(rewards), "completion_tokens": sum(lengths) / len(lengths)}

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        roll = self.rollout(model, batch)
        self._step.setdefault("rewards", []).extend(roll["rewards"].tolist())
        self._step.setdefault("lengths", []).extend(roll["cmask"].sum(1).tolist())
        advantages = group_advantages(roll["rewards"], self.num_generations)
        logps, mask = self.completion_logps(model, roll)
        ref = None
        if self.beta != 0.0:
            with torch.no_grad(), self.reference(model):
                ref, _ = self.completion_logps(model, roll)
        losses = grpo_token_loss(logps, logps.detach(), ref, advantages, mask, beta=self.beta,
                                 epsilon=float(self.grpo["epsilon"]))  # fmt: skip
        return losses.sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        if not data.val:
            return None
        total = right = 0.0
        for part in batched(data.val, args.batch_size):
            batch = {k: v.to(device) for k, v in self.collate(part).items()}
            roll = self.rollout(model, batch, greedy=True)
            total += float(roll["rewards"].sum())
            right += sum(_exact(roll["texts"], [self.answers[int(i)] for i in batch["index"]]))
        n = len(data.val)
        return {"reward": total / n, "exact": right / n, "prompts": n}
