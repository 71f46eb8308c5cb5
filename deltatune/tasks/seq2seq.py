"""seq2seq: an encoder-decoder (T5, BART, ...; `AutoModelForSeq2SeqLM`) on instruction rows.

    deltatune sft --task seq2seq --model t5-folder --dataset alpaca-en --max-length 128

Rows are canonical chats (alpaca, sharegpt, ... converted on load): the source is the
conversation up to the last assistant turn (a system turn and earlier turns joined as
"role: text" lines, the last user turn as is), the target is the last assistant turn plus EOS.
Source and target are truncated to --max-length tokens each. The decoder is trained on every
target token (the model shifts the labels right itself); the loss is summed over target tokens
and normalised by the step's target-token count. Metrics: held-out loss, and ROUGE-L (F1 on
words) of greedy generations for up to 32 held-out rows; sample generations before and after.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.tasks.base import Log, TaskData, batched

IGNORE_INDEX = -100
ROUGE_ROWS = 32
"""Held-out rows generated for ROUGE-L at each evaluation."""


def source_and_target(messages: list[dict[str, str]]) -> tuple[str, str]:
    """(source text, target text) of a chat: everything before the last answer, and that answer."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    before = messages[:last]
    if len(before) == 1:
        return before[0]["content"], messages[last]["content"]
    lines = [f"{m['role']}: {m['content']}" for m in before[:-1]] + [before[-1]["content"]]
    return "\n".join(lines), messages[last]["content"]


class Seq2SeqTask:
    name = "seq2seq"
    task_type = "SEQ_2_SEQ_LM"

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.source: str | None = None
        self.pad_id = 0

    def _source(self, args: Any, log: Log) -> str:
        from deltatune.models import resolve_model

        if self.source is None:
            self.source, _ = resolve_model(args.model, log=log)
        return self.source

    def load_processor(self, args: Any, log: Log, given: Any = None) -> Any:
        from deltatune.tasks.encoders import load_encoder_tokenizer

        if given is None:
            given = load_encoder_tokenizer(self._source(args, log), trust_remote_code=args.trust_remote_code)
        self.tokenizer = given
        self.pad_id = given.pad_token_id if given.pad_token_id is not None else 0
        return given

    def prepare_data(self, args: Any, processor: Any, log: Log) -> TaskData:
        from deltatune.data import DataError, load_rows
        from deltatune.train.data import split_rows

        rows, report = load_rows(args.dataset, seed=args.seed)
        log(report.summary())
        if not all("messages" in r for r in rows):
            raise DataError(
                f"--dataset {args.dataset}: --task {self.name} needs chat or instruction rows "
                "(messages, alpaca, sharegpt; e.g. alpaca-en, chatterbot-en)"
            )
        train_rows, val_rows = split_rows(rows, args.val_size, args.seed, log)
        train, val = self.encode(train_rows, args), self.encode(val_rows, args)
        log(f"{len(train)} train / {len(val)} held-out pairs (source and target each <= {args.max_length} tokens)")
        return TaskData(train, val)

    def encode(self, rows: list[dict], args: Any) -> list[dict[str, Any]]:
        eos = self.tokenizer.eos_token_id
        examples = []
        for row in rows:
            source, target = source_and_target(row["messages"])
            ids = list(self.tokenizer(source, truncation=True, max_length=args.max_length)["input_ids"])
            labels = list(self.tokenizer(target, add_special_tokens=False)["input_ids"])[: args.max_length - 1]
            examples.append({"input_ids": ids, "labels": labels + [eos], "source": source, "target": target})
        return examples

    def load_model(self, args: Any, data: TaskData, log: Log) -> nn.Module:
        import transformers

        from deltatune.models import ModelError
        from deltatune.models.registry import DTYPES, check_remote_code

        source = self._source(args, log)
        check_remote_code(source, trust_remote_code=args.trust_remote_code)
        try:
            return transformers.AutoModelForSeq2SeqLM.from_pretrained(
                source, dtype=getattr(torch, DTYPES[args.dtype]), trust_remote_code=args.trust_remote_code
            )
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"--model {args.model}: not loadable with AutoModelForSeq2SeqLM: {first[:300]}") from None

    def tuner_defaults(self, args: Any, model: nn.Module | None, model_spec: Any) -> dict[str, Any]:
        return {"task_type": self.task_type}  # targets: peft's per-architecture table (T5 q/v, BART q_proj/v_proj)

    def length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"]) + len(example["labels"])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        target = max(len(e["labels"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)  # (B, S)
        mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, S)
        labels = torch.full((len(examples), target), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**batch).logits  # (B, T, V): decoder inputs are the labels shifted right
        return nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    @torch.no_grad()
    def generate(self, model: nn.Module, examples: list[dict[str, Any]], args: Any, device: Any) -> list[str]:
        outputs: list[str] = []
        for chunk in batched(examples, 16):
            batch = self.collate(chunk)
            out = model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
            )  # fmt: skip
            outputs += [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return outputs

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        from deltatune.train.evaluate import mean_rouge_l

        if not data.val:
            return None
        was_training = model.training
        model.eval()
        loss, count = 0.0, 0
        for chunk in batched(data.val, max(args.batch_size, 16)):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            loss += float(self.loss_sum(model, batch))
            count += self.units(batch)
        scored = data.val[:ROUGE_ROWS]
        rouge = mean_rouge_l(self.generate(model, scored, args, device), [e["target"] for e in scored])
        model.train(was_training)
        return {"rouge_l": rouge, "loss": loss / max(count, 1), "rouge_rows": len(scored)}

    def samples(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> list[dict[str, str]]:
        rows = data.val[: args.num_samples]
        if not rows:
            return []
        was_training = model.training
        model.eval()
        outputs = self.generate(model, rows, args, device)
        model.train(was_training)
        return [{"prompt": e["source"], "reference": e["target"], "output": o} for e, o in zip(rows, outputs)]
