"""pretrain: continued pretraining of a causal LM on raw text, packed.

    deltatune sft --task pretrain --model M --dataset notes.txt,more.jsonl --max-length 512

Sources (comma-separated, each optionally NAME#N): local `.txt` files (one document per block
of text between blank lines) and `.jsonl`/`.json`/`.csv`/`.parquet` files or catalogue entries
whose rows have a `"text"` field. Rows without usable text are counted per reason with their
file:line. Every document is tokenized with EOS at its end and every token is supervised; a
document longer than --max-length is cut into pieces of --max-length tokens.

Training rows are always packed (`deltatune.data.pack`): pieces are concatenated into rows of up
to --max-length tokens, position ids restart per piece and attention stays inside each piece
(see causal_lm.py), so packing changes the padding, never the per-document loss. Held-out
pieces are evaluated one per row: held-out loss and perplexity, as for causal-lm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.tasks.base import Log, TaskData
from deltatune.tasks.causal_lm import CausalLMTask


def read_documents(spec: str, seed: int) -> tuple[list[str], Any]:
    """Documents of a dataset spec, and the DataReport of what was dropped where.

    Raises:
        DataError: no usable document, or a source that is neither a .txt file nor has text rows.
    """
    import random

    from deltatune.data import DataError, DataReport, load_rows, parse_spec
    from deltatune.data.loading import sample_rows
    from deltatune.data.readers import LOCAL_SUFFIXES, read_local

    report = DataReport(source=spec)
    documents: list[str] = []
    for source in parse_spec(spec):
        path = Path(source.name)
        found: list[str] = []
        if path.suffix.lower() == ".txt":
            if not path.is_file():
                raise DataError(f"data file not found: {path}")
            text = path.read_bytes().decode("utf-8", errors="replace")
            blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
            found = [b for b in blocks if b]
            report.total += len(found)
        elif path.suffix.lower() in LOCAL_SUFFIXES:
            for row, where in read_local(path, report):
                report.total += 1
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str):
                    report.add("missing_field" if text is None else "wrong_type", where, "field 'text'")
                elif not text.strip():
                    report.add("empty_turn", where, "field 'text' is empty")
                else:
                    found.append(text)
        else:  # a catalogue entry: any text-bearing rows (classification sets, for instance)
            rows, part = load_rows(source.name, seed=seed)
            report.merge(part)
            found = [r["text"] for r in rows if isinstance(r.get("text"), str) and r["text"].strip()]
            if not found:
                raise DataError(f"{source.name}: --task pretrain needs rows with a 'text' field (or .txt files)")
        if source.sample is not None:
            found = sample_rows(found, source.sample, random.Random(seed))
        documents += found
    report.kept = len(documents)
    if not documents:
        raise DataError(f"--dataset {spec}: no usable text ({report.summary()})")
    return documents, report


def encode_documents(tokenizer: Any, documents: list[str], max_length: int) -> list[dict[str, list[int]]]:
    """Each document + EOS, cut into pieces of at most max_length tokens, every token a label."""
    eos = tokenizer.eos_token_id
    pieces = []
    for text in documents:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
        for start in range(0, len(ids), max_length):
            piece = ids[start : start + max_length]
            if len(piece) >= 2:  # a lone token predicts nothing
                pieces.append({"input_ids": piece, "labels": list(piece), "attention_mask": [1] * len(piece)})
    return pieces


class PretrainTask:
    name = "pretrain"
    supports_packing = True

    def __init__(self) -> None:
        self.lm = CausalLMTask()  # loading, loss and metrics are the causal LM's

    def load_processor(self, args: Any, log: Log, given: Any = None) -> Any:
        tokenizer = self.lm.load_processor(args, log, given)
        self.lm.packed = True
        return tokenizer

    def prepare_data(self, args: Any, processor: Any, log: Log) -> TaskData:
        from deltatune.train.data import split_rows

        documents, report = read_documents(args.dataset, args.seed)
        log(report.summary())
        train_docs, val_docs = split_rows(documents, args.val_size, args.seed, log)
        train = encode_documents(processor, train_docs, args.max_length)
        val = encode_documents(processor, val_docs, args.max_length)
        log(f"{len(train_docs)} train / {len(val_docs)} held-out documents -> {len(train)} / {len(val)} pieces "
            f"of <= {args.max_length} tokens ({sum(len(p['input_ids']) for p in train)} training tokens)")  # fmt: skip
        return self.lm.finish_examples(TaskData(train, val), args, log)

    def load_model(self, args: Any, data: TaskData, log: Log) -> nn.Module:
        return self.lm.load_model(args, data, log)

    def tuner_defaults(self, args: Any, model: nn.Module | None, model_spec: Any) -> dict[str, Any]:
        return self.lm.tuner_defaults(args, model, model_spec)

    def structural(self) -> dict[str, Any]:
        return {"packing": True}

    def length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.lm.collate(examples)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return self.lm.units(batch)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lm.loss_sum(model, batch)

    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        return self.lm.evaluate(model, data, args, device)
