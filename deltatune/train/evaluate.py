"""Held-out loss, greedy generation with the chat template, and ROUGE-L.

Loss is token-level: the sum of every supervised token's cross-entropy over the number of
supervised tokens (shifted by one, as a causal LM predicts the next token).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from deltatune.data import collate
from deltatune.ops import causal_lm_loss
from deltatune.text import words


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over supervised positions, number of those positions).

    Goes through `deltatune.ops.causal_lm_loss`: with a frozen output head the full-vocabulary
    logits are never materialised (chunked loss); otherwise the plain path."""
    loss, count = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    return loss, int(count)


@torch.no_grad()
def evaluate_loss(
    model: Any, examples: Sequence[dict], *, batch_size: int, pad_id: int, device: Any = "cpu", progress: bool = True
) -> dict[str, float]:
    """{"loss", "perplexity", "tokens"} over `examples`; a progress bar on a terminal unless progress=False."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in _batches(len(examples), batch_size, "held-out loss", progress):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        loss, n = token_loss_sum(model, batch)
        total += float(loss)
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[list[dict[str, str]]], *, max_new_tokens: int = 64,
    batch_size: int = 8, streamer: Any = None, device: Any = "cpu", progress: bool = True,
) -> list[str]:  # fmt: skip
    """Greedy answers to conversations (each ending with a user turn), batched with left padding; a progress
    bar on a terminal when there is more than one batch, unless progress=False."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in _batches(len(prompts), batch_size, "generating answers", progress and streamer is None):
            texts = [
                tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
                for p in prompts[start : start + batch_size]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                streamer=streamer, temperature=None, top_p=None, top_k=None, use_cache=True,
            )  # fmt: skip
            new = out[:, enc["input_ids"].shape[1] :]  # (B, new)
            answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def _batches(n: int, batch_size: int, what: str, progress: bool) -> Iterable[int]:
    """Batch start offsets, shown as a progress bar on stderr when it is a terminal (tqdm's disable=None)
    and there is more than one batch: evaluation on CPU can otherwise be minutes of silence."""
    starts = range(0, n, batch_size)
    if not progress or len(starts) < 2:
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc=what, unit="batch", disable=None, leave=False, dynamic_ncols=True)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased word tokens, CJK by character (Lin 2004): 2PR / (P + R) from the LCS."""
    pred, ref = words(prediction), words(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(predictions: Iterable[str], references: Iterable[str]) -> float:
    scores = [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / max(len(scores), 1)
