"""causal-lm: chat / instruction fine-tuning of a decoder (the default task of `deltatune sft`).

Rows are canonical chats (`{"messages": [...]}`; alpaca, sharegpt and friends are converted on
load). Each row is rendered with the model's chat template; only the assistant turns and their
closing end-of-turn token are supervised (`deltatune.data.tokenization`). The loss is the sum of
next-token cross-entropies over supervised tokens (chunked over a frozen head, `deltatune.ops`),
normalised by the step's supervised-token count. Metrics: held-out loss and perplexity; greedy
sample answers before and after.

With `--packing`, examples are concatenated into rows of up to `--max-length` tokens with
position ids restarting at 0 per example and no attention mask: transformers then builds a
block-diagonal causal mask from the position ids (SDPA / eager), or uses varlen flash attention,
so no token attends across an example boundary, and no label crosses one either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.tasks.base import Log, TaskData
from deltatune.text import word_count


class CausalLMTask:
    name = "causal-lm"
    task_type = "CAUSAL_LM"
    supports_packing = True

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.source: str | None = None
        self.pad_id = 0
        self.packed = False

    # -- loading ------------------------------------------------------------------------------------
    def load_processor(self, args: Any, log: Log, given: Any = None) -> Any:
        from deltatune.models import load_tokenizer

        self.packed = bool(getattr(args, "packing", False))
        self.tokenizer = (
            given
            if given is not None
            else load_tokenizer(self._source(args, log), trust_remote_code=args.trust_remote_code)
        )
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return tok

    def _source(self, args: Any, log: Log) -> str:
        from deltatune.models import resolve_model

        if self.source is None:
            self.source, _ = resolve_model(args.model, log=log)
        return self.source

    def load_model(self, args: Any, data: TaskData, log: Log = print) -> nn.Module:
        from deltatune.models import load_model

        return load_model(
            self._source(args, log), dtype=args.dtype, quantize=args.quantize,
            trust_remote_code=args.trust_remote_code, task_type=self.task_type,
        )  # fmt: skip

    def tuner_defaults(self, args: Any, model: nn.Module, model_spec: Any) -> dict[str, Any]:
        from deltatune.train.setup import default_fields

        return default_fields(args.tuner, model_spec)

    def structural(self) -> dict[str, Any]:
        from deltatune.train.args import stable_hash

        template = getattr(self.tokenizer, "chat_template", None) or ""
        return {"chat_template_sha256": stable_hash(template), "packing": self.packed}

    # -- data ---------------------------------------------------------------------------------------
    def prepare_data(self, args: Any, processor: Any, log: Log) -> TaskData:
        from deltatune.data import encode_rows, load_rows
        from deltatune.train.data import split_rows

        rows, report = load_rows(args.dataset, seed=args.seed, max_bad_fraction=args.max_bad_fraction)
        log(report.summary())
        train_rows, val_rows = split_rows(rows, args.val_size, args.seed, log)
        train, enc_report = encode_rows(processor, train_rows, max_length=args.max_length)
        log(enc_report.summary())
        val, _ = encode_rows(processor, val_rows, max_length=args.max_length) if val_rows else ([], None)
        prompts, references = [], []
        for row in val_rows:
            if len(prompts) == args.num_samples or "messages" not in row:
                break
            last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
            prompt, answer = row["messages"][:last], row["messages"][last]["content"]
            if word_count(prompt[-1]["content"]) >= 2 and word_count(answer) >= 2:  # skip "2" -> "'"; CJK by character
                prompts.append(prompt)
                references.append(answer)
        return self.finish_examples(
            TaskData(train, val, extra={"prompts": prompts, "references": references}), args, log
        )

    def finish_examples(self, data: TaskData, args: Any, log: Log) -> TaskData:
        """Pack the training examples when --packing (held-out ones stay one per row)."""
        if self.packed:
            from deltatune.data import pack

            n = len(data.train)
            data.train = pack(data.train, args.max_length)
            tokens = sum(len(e["input_ids"]) for e in data.train)
            log(f"packing: {n} examples -> {len(data.train)} rows of <= {args.max_length} tokens "
                f"({tokens / (len(data.train) * args.max_length):.0%} full)")  # fmt: skip
        return data

    def length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from deltatune.data import collate

        return collate(examples, self.pad_id)

    # -- loss and metrics ---------------------------------------------------------------------------
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from deltatune.ops import causal_lm_loss

        if "position_ids" in batch:
            # Packed rows go in without a 2-D mask, so the model derives one causal block per
            # example from the position ids (the padding at the end restarts at 0: blocks of its own,
            # labels -100).
            # use_cache=False: with a cache transformers skips that detection.
            loss, _ = causal_lm_loss(
                model, batch["input_ids"], batch["labels"], None, position_ids=batch["position_ids"], use_cache=False
            )
        else:
            loss, _ = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> dict[str, float] | None:
        from deltatune.train.evaluate import evaluate_loss

        if not data.val:
            return None
        return evaluate_loss(model, data.val, batch_size=args.batch_size, pad_id=self.pad_id, device=device)

    def samples(self, model: nn.Module, data: TaskData, args: Any, device: Any) -> list[dict[str, str]]:
        from deltatune.train.evaluate import generate_answers

        prompts = data.extra.get("prompts") or []
        if not prompts or args.num_samples == 0:
            return []
        answers = generate_answers(model, self.tokenizer, prompts, max_new_tokens=args.max_new_tokens, device=device)
        return [
            {"prompt": p[-1]["content"], "reference": r, "output": a}
            for p, r, a in zip(prompts, data.extra["references"], answers)
        ]
