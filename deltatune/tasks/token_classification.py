"""token-classification: a tag per word (NER), a new head on a text encoder, adapted.

    deltatune sft --task token-classification --model all-minilm-l6-v2 --dataset peoples-daily-ner-zh#3000

Rows are `{"tokens": [word, ...], "tags": [BIO tag, ...]}` (peoples-daily-ner-zh, local files).
Words are split into sub-words by a fast tokenizer (`is_split_into_words`); the label of a word
goes on its FIRST sub-word only, every other sub-word and special token gets -100 (the usual
alignment: each word counts once in the loss and in the metric). Words cut off by --max-length
are neither trained on nor scored. The loss is the cross-entropy summed over labelled sub-words,
normalised by the step's labelled count. Metric: entity-level micro F1 over exact spans
(seqeval-style, `deltatune.tasks.encoders.entity_f1`), with precision and recall.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.tasks.base import Log, TaskData, batched
from deltatune.tasks.encoders import entity_f1, label_names, load_encoder_tokenizer, resolve_encoder
from deltatune.tasks.sequence_classification import load_classifier

IGNORE_INDEX = -100


class TokenClassificationTask:
    name = "token-classification"
    task_type = "TOKEN_CLS"

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.source: str | None = None
        self.pad_id = 0
        self.labels: list[str] | None = None  # fixed label table (evaluating a trained run's head)

    def _source(self, args: Any, log: Log) -> str:
        if self.source is None:
            self.source = resolve_encoder(args.model, log)
        return self.source

    def load_processor(self, args: Any, log: Log, given: Any = None) -> Any:
        from deltatune.models import ModelError

        if given is None:
            given = load_encoder_tokenizer(self._source(args, log), trust_remote_code=args.trust_remote_code)
        if not getattr(given, "is_fast", False):
            raise ModelError(f"--task {self.name} needs a fast tokenizer (word ids for label alignment)")
        self.tokenizer = given
        self.pad_id = given.pad_token_id if given.pad_token_id is not None else 0
        return given

    def prepare_data(self, args: Any, processor: Any, log: Log) -> TaskData:
        from deltatune.data import DataError, load_rows
        from deltatune.train.data import split_rows

        rows, report = load_rows(args.dataset, seed=args.seed)
        log(report.summary())
        if not all("tokens" in r and "tags" in r for r in rows):
            kind = "chat" if "messages" in rows[0] else "classification" if "label" in rows[0] else "non-NER"
            raise DataError(
                f"--dataset {args.dataset}: --task {self.name} needs rows with 'tokens' and 'tags' "
                f"(e.g. peoples-daily-ner-zh), got {kind} rows"
            )
        names = self.labels or label_names([t for r in rows for t in r["tags"]], first="O")
        ids = {name: i for i, name in enumerate(names)}
        train_rows, val_rows = split_rows(rows, args.val_size, args.seed, log)
        train, val = self._encode(train_rows, ids, args), self._encode(val_rows, ids, args)
        words = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in train)
        log(f"{len(train)} train / {len(val)} held-out rows, {words} labelled words, tags {', '.join(names)}")
        return TaskData(train, val, info={"num_labels": len(names), "labels": names})

    def _encode(self, rows: list[dict], ids: dict[str, int], args: Any) -> list[dict[str, Any]]:
        examples = []
        for row in rows:
            enc = self.tokenizer(row["tokens"], is_split_into_words=True, truncation=True, max_length=args.max_length)
            labels, previous = [], None
            for word in enc.word_ids():
                first = word is not None and word != previous
                if first and row["tags"][word] not in ids:
                    from deltatune.data import DataError

                    raise DataError(f"tag {row['tags'][word]!r} is not one of the run's tags {sorted(ids)}")
                labels.append(ids[row["tags"][word]] if first else IGNORE_INDEX)
                previous = word
            examples.append({"input_ids": list(enc["input_ids"]), "labels": labels})
        return examples

    def load_model(self, args: Any, data: TaskData, log: Log) -> nn.Module:
        return load_classifier(
            "AutoModelForTokenClassification", self._source(args, log), data.info["labels"], args, self.pad_id
        )

    def tuner_defaults(self, args: Any, model: nn.Module | None, model_spec: Any) -> dict[str, Any]:
        return {"task_type": self.task_type}

    def length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from deltatune.data import collate

        return collate(examples, self.pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, C)
        return nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        if not data.val:
            return None
        names = data.info["labels"]
        was_training = model.training
        model.eval()
        predicted, gold, loss, count = [], [], 0.0, 0
        for chunk in batched(data.val, max(args.batch_size, 32)):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"]
            loss += float(
                nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            )
            count += int((labels != IGNORE_INDEX).sum())
            for row_logits, row_labels in zip(logits.argmax(-1).tolist(), labels.tolist()):
                kept = [(p, y) for p, y in zip(row_logits, row_labels) if y != IGNORE_INDEX]  # one per word
                predicted.append([names[p] for p, _ in kept])
                gold.append([names[y] for _, y in kept])
        model.train(was_training)
        return {**entity_f1(predicted, gold), "loss": loss / max(count, 1), "words": count}
