"""KTO: unpaired preference training from rows labelled desirable / undesirable.

Rows are `{"prompt": [messages], "completion": str, "label": bool}`. As in TRL (trl 1.16
KTOTrainer, loss_type "kto"), with r = log pi(y|x) - log ref(y|x) summed over the completion and
z = the batch's KL estimate, max(0, mean(log pi(y'|x) - log ref(y'|x))) over mismatched pairs
(prompt i with the completion of row i-1 of the same micro-batch), computed without gradients:

    desirable:   desirable_weight   * (1 - sigmoid(beta * (r - z)))
    undesirable: undesirable_weight * (1 - sigmoid(beta * (z - r)))

averaged over the rows (units = rows). The reference is the adapter disabled (or --ref-adapter).
Held-out metrics: reward accuracy (desirable rows with reward > 0, undesirable with reward < 0),
mean reward margin between the two groups, loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.tasks.base import Log, TaskData, batched, to_device
from deltatune.tasks.preference import PreferenceTask


class KTOTask(PreferenceTask):
    name = "kto"

    def prepare_data(self, args: Any, processor: Any, log: Log) -> TaskData:
        from deltatune.data import DataError, DataReport, load_rows
        from deltatune.data.preference import encode_answer
        from deltatune.train.data import split_rows

        rows, report = load_rows(args.dataset, seed=args.seed, max_bad_fraction=args.max_bad_fraction)
        log(report.summary())
        if rows and "completion" not in rows[0]:
            raise DataError(
                f"{args.dataset}: kto needs rows with prompt (or messages), completion and a boolean label; "
                "e.g. --dataset chatterbot-kto-en"
            )
        train_rows, val_rows = split_rows(rows, args.val_size, args.seed, log)

        def encode(part: list[dict]) -> tuple[list[dict], DataReport]:
            enc = DataReport(source="tokenization")
            out = []
            for i, row in enumerate(part):
                enc.total += 1
                example = encode_answer(processor, row["prompt"], row["completion"], args.max_length)
                if example is None:
                    enc.add(
                        "labels_fully_masked", f"row {i}", f"the prompt leaves no answer token within {args.max_length}"
                    )
                    continue
                # nested, so the engine's length-based batching stays off (the KL rows pair up within a batch)
                start = next(j for j, v in enumerate(example["labels"]) if v != -100)
                out.append({"row": example, "label": bool(row["label"]), "prompt_length": start})
            enc.kept = len(out)
            return out, enc

        train, enc_report = encode(train_rows)
        log(enc_report.summary())
        enc_report.check(args.max_bad_fraction)
        val, _ = encode(val_rows) if val_rows else ([], None)
        prompts = [r["prompt"] for r in val_rows if r["label"]][: args.num_samples]
        references = [r["completion"] for r in val_rows if r["label"]][: args.num_samples]
        return TaskData(train, val, extra={"prompts": prompts, "references": references})

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Rows, their labels, and the mismatched KL rows (prompt i + completion of row i-1)."""
        from deltatune.data import collate

        batch = collate([e["row"] for e in examples], self.pad_id)
        mismatched = []
        for i, example in enumerate(examples):
            other = examples[i - 1]
            p, q = example["prompt_length"], other["prompt_length"]
            ids = example["row"]["input_ids"][:p] + other["row"]["input_ids"][q:]
            labels = [-100] * p + other["row"]["labels"][q:]
            mismatched.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
        kl = collate(mismatched, self.pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    def row_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-row losses (B,), rewards beta * r (B,), detached)."""
        from deltatune.ops.sequence_logps import sequence_logps

        main = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
        kl_batch = {k: batch[f"kl_{k}"] for k in ("input_ids", "labels", "attention_mask")}
        logps, _ = sequence_logps(model, main["input_ids"], main["labels"], main["attention_mask"])
        with torch.no_grad():
            kl_policy, _ = sequence_logps(model, kl_batch["input_ids"], kl_batch["labels"], kl_batch["attention_mask"])
        kl_ref = self.reference_logps(model, kl_batch)
        ref = self.reference_logps(model, main)
        kl = (kl_policy - kl_ref).mean().clamp(min=0)
        ratio = logps - ref
        desirable = batch["label"]
        losses = torch.where(
            desirable,
            self.options["desirable_weight"] * (1 - F.sigmoid(self.beta * (ratio - kl))),
            self.options["undesirable_weight"] * (1 - F.sigmoid(self.beta * (kl - ratio))),
        )
        return losses, (self.beta * ratio).detach()

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.row_losses(model, batch)[0].sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        if not data.val:
            return None
        was_training = model.training
        model.eval()
        right = loss = 0.0
        good: list[float] = []
        bad: list[float] = []
        try:
            for part in batched(data.val, args.batch_size):
                batch = to_device(self.collate(part), device)
                losses, rewards = self.row_losses(model, batch)
                label = batch["label"]
                right += float(((rewards > 0) & label).sum() + ((rewards < 0) & ~label).sum())
                good += rewards[label].tolist()
                bad += rewards[~label].tolist()
                loss += float(losses.sum())
        finally:
            model.train(was_training)
        n = len(data.val)
        margin = (sum(good) / max(len(good), 1)) - (sum(bad) / max(len(bad), 1))
        return {"reward_accuracy": right / n, "reward_margin": margin, "loss": loss / n, "rows": n}
