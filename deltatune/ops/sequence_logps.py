"""Per-sequence log-probabilities of the supervised tokens, without full-vocabulary logits.

Preference losses (DPO and relatives) need, for each row, the sum (or mean) of log p(token) over
its answer tokens. The plain way builds logits (B, T, V) in fp32 and a log-softmax of the same
size. Like `deltatune.ops.fused_ce`, this walks only the supervised tokens in chunks through the
frozen head and keeps, per token, its log-prob and its gradient with respect to the hidden state,
d log p(y_t) / d h_t = (onehot(y_t) - softmax(h_t W^T)) W, so peak extra memory is one chunk of
logits. Backward scales each token's stored gradient by the incoming per-token gradient, so any
loss built from the per-row sums (DPO's sigmoid, ORPO's odds ratio, ...) gets exact gradients.

Falls back to full logits when the head trains, the model post-processes logits, or an input
adapter prepends virtual tokens (same rules as `causal_lm_loss`).
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.ops.fused_ce import IGNORE_INDEX, _plain_head


class _FusedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int):  # hidden (n, H), targets (n,)
        needs_grad = ctx.needs_input_grad[0]
        n, vocab = hidden.shape[0], weight.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_rows = hidden.new_empty((n, hidden.shape[1])) if needs_grad else None
        buffer = torch.empty((min(chunk_tokens, max(n, 1)), vocab), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            h, y = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens, None]
            logits = buffer[: len(h)]
            logits.copy_(torch.nn.functional.linear(h, weight, bias))
            picked = logits.gather(1, y)
            peak = logits.amax(1, keepdim=True)
            logits.sub_(peak).exp_()
            norm = logits.sum(1, keepdim=True)
            out[start : start + len(h)] = (picked - peak - norm.log()).squeeze(1)
            if needs_grad:
                probs = logits.div_(norm).neg_()  # -softmax
                probs.scatter_add_(1, y, probs.new_ones(y.shape))  # onehot - softmax
                grad_rows[start : start + len(h)] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_rows if needs_grad else hidden.new_empty(0))
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_output.to(grad_rows.dtype)[:, None], None, None, None, None


def token_logps(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
    *, chunk_tokens: int | None = None, temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(per-token log-probs (B, T-1) with 0 at unsupervised positions, mask (B, T-1) of supervised ones).

    Position t holds log p(labels[t + 1] | tokens <= t); labels are -100 where not supervised.
    Uses the chunked path over supervised tokens when the model has a frozen plain head and no
    input adapter; the dense path otherwise (same numbers up to float rounding).
    """
    inner = getattr(model, "get_base_model", lambda: model)()
    head = _plain_head(inner)
    backbone = getattr(inner, "base_model", None)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rewrites = getattr(model, "rewrites_inputs", False)
    if head is None or backbone is None or backbone is inner or rewrites or temperature != 1.0:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits[:, -input_ids.shape[1] :][:, :-1].float() / temperature
        picked = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
        return picked * mask, mask
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1]  # (B, T-1, H)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    chunk = chunk_tokens or max(1, (12 * 2**20) // head.weight.shape[0])
    picked = _FusedTokenLogps.apply(flat, head.weight, head.bias, targets.reshape(-1).index_select(0, rows), chunk)
    out = picked.new_zeros(mask.numel()).index_put((rows,), picked).view(mask.shape)
    return out, mask


def sequence_logps(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(sum of supervised-token log-probs per row (B,), supervised-token count per row (B,))."""
    logps, mask = token_logps(model, input_ids, labels, attention_mask, **kwargs)
    return logps.sum(1), mask.sum(1)
