"""Cross-entropy over a frozen output head without materialising the full logits.

A causal LM's loss normally builds logits of shape (B, T, V) — for V = 32k..150k that is often the
largest tensor of the whole step, and autograd keeps it (and its softmax) for backward. When the
head is frozen (every PEFT method except those that train it), the gradient the head passes back
is only  dL/dh = (softmax(h W^T) - onehot(y)) W  per token. So we walk the tokens in chunks, compute
each chunk's logits, its loss and that gradient right away, and keep only dL/dh (N, H): peak extra
memory is one chunk of logits instead of all of them, and the FLOPs are the same as the plain path
(the matmul that backward would do happens in forward instead).

Falls back to the plain path (model(..., labels=...)) when the head trains, or the model applies
something after the head that we do not reproduce (logit soft-capping / scaling).
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens: int):  # hidden (N, H), labels (N,)
        needs_grad = ctx.needs_input_grad[0]  # forward itself runs without grad mode
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]  # (c, H)
            y = labels[start : start + chunk_tokens]  # (c,)
            logits = torch.nn.functional.linear(h, weight, bias).float()  # (c, V)
            valid = y != IGNORE_INDEX
            target = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if needs_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (c, V)
                probs[torch.arange(len(y), device=y.device), target] -= 1.0
                probs.mul_(valid[:, None])
                grad_hidden[start : start + chunk_tokens] = probs.to(weight.dtype) @ weight  # (c, H)
        ctx.save_for_backward(grad_hidden if needs_grad else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, *, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Sum of token cross-entropies of `hidden @ weight.T + bias` against `labels` (-100 ignored).

    Args:
        hidden: (N, H) activations; weight: (V, H) frozen head; labels: (N,).
        chunk_tokens: tokens per chunk (default: about 8M logits per chunk; on an H200 64M was no faster).
    Returns:
        A scalar fp32 sum (divide by the number of supervised tokens for the mean).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("fused_linear_cross_entropy needs a frozen head; use the plain loss when the head trains")
    chunk = chunk_tokens or max(1, (8 * 2**20) // weight.shape[0])
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk)


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head if it is a frozen nn.Linear applied as is (else None)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear or head.weight.requires_grad:
        return None
    if head.bias is not None and head.bias.requires_grad:
        return None
    for attribute in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            return None
    return head


def causal_lm_loss(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses, number of supervised tokens as a 0-dim tensor) for a causal LM.

    The count stays a tensor so a GPU step never waits on a host sync; `int(count)` when needed.

    Uses the fused chunked path when the model (a transformers causal LM, possibly inside a
    TunedModel with delta tuners) has a frozen plain head; otherwise computes logits as usual.
    """
    inner = getattr(model, "get_base_model", lambda: model)()
    head = _plain_head(inner)
    backbone = getattr(inner, "base_model", None)
    shifted = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    if head is None or backbone is None or backbone is inner or getattr(model, "rewrites_inputs", False):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits  # (B, P + T, V)
        virtual = logits.shape[1] - input_ids.shape[1]
        if virtual > 0:  # prompt-learning adapters prepend P positions; the last one predicts token 0 (as peft)
            logits, shifted = logits[:, virtual - 1 : -1], labels.reshape(-1)
        else:
            logits = logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss, (shifted != IGNORE_INDEX).sum()
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state  # (B, T, H)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H)
    return fused_linear_cross_entropy(hidden, head.weight, head.bias, shifted), (shifted != IGNORE_INDEX).sum()
