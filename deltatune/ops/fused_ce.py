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
        # Only supervised tokens reach the head: chat SFT masks the prompt, often half the tokens.
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
        n, vocab = rows.numel(), weight.shape[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_rows = hidden.new_empty((n, hidden.shape[1])) if needs_grad else None
        # One fp32 buffer for every chunk's logits, overwritten in place: no per-chunk allocation
        # (on the CPU each fresh tens-of-MB block costs page faults) and no temporaries.
        pieces = max(1, -(-n // chunk_tokens))
        chunk_tokens = -(-n // pieces) if n else 1  # equal chunks: no small, slow last matmul
        buffer = torch.empty((min(chunk_tokens, n), vocab), dtype=torch.float32, device=hidden.device)
        same_dtype = weight.dtype == torch.float32
        every = n == hidden.shape[0]
        for start in range(0, n, chunk_tokens):
            index = rows[start : start + chunk_tokens]
            if every:  # slices are views: no copy
                h, y = hidden[start : start + len(index)], labels[start : start + len(index), None]
            else:
                h, y = hidden.index_select(0, index), labels.index_select(0, index)[:, None]  # (c, H), (c, 1)
            logits = buffer[: len(index)]  # (c, V)
            if same_dtype:
                torch.mm(h, weight.t(), out=logits)
                if bias is not None:
                    logits.add_(bias)
            else:  # low-precision head: matmul in its dtype, softmax in fp32
                logits.copy_(torch.nn.functional.linear(h, weight, bias))
            picked = logits.gather(1, y)  # (c, 1)
            peak = logits.amax(1, keepdim=True)  # (c, 1)
            logits.sub_(peak).exp_()
            norm = logits.sum(1, keepdim=True)  # (c, 1)
            total += (peak + norm.log() - picked).sum()
            if needs_grad:
                probs = logits.div_(norm)  # softmax, in place
                probs.scatter_add_(1, y, probs.new_full(y.shape, -1.0))  # minus one-hot(y)
                if same_dtype:
                    torch.mm(probs, weight, out=grad_rows[start : start + len(index)])  # (c, H)
                else:
                    grad_rows[start : start + len(index)] = probs.to(weight.dtype) @ weight
        ctx.rows_shape = hidden.shape
        ctx.save_for_backward(grad_rows if needs_grad else hidden.new_empty(0), rows)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_rows, rows = ctx.saved_tensors
        grad_rows = grad_rows * grad_output.to(grad_rows.dtype)
        if rows.numel() == ctx.rows_shape[0]:  # every token supervised: rows is 0..N-1
            return grad_rows, None, None, None, None
        grad_hidden = grad_rows.new_zeros(ctx.rows_shape)
        return grad_hidden.index_copy_(0, rows, grad_rows), None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, *, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Sum of token cross-entropies of `hidden @ weight.T + bias` against `labels` (-100 ignored).

    Args:
        hidden: (N, H) activations; weight: (V, H) frozen head; labels: (N,).
        chunk_tokens: most tokens per chunk (default: about 12M logits, 48 MiB in fp32; on 2 CPU cores
            8M was 2-5% slower, 16M no faster than 12M; on an H200 64M was no faster than 8M).
            The supervised tokens are cut into equal chunks of at most this many.
    Returns:
        A scalar fp32 sum (divide by the number of supervised tokens for the mean).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("fused_linear_cross_entropy needs a frozen head; use the plain loss when the head trains")
    chunk = chunk_tokens or max(1, (12 * 2**20) // weight.shape[0])
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
    rewrites = getattr(model, "rewrites_inputs", False)
    if head is None or backbone is None or backbone is inner or (rewrites and not hasattr(model, "model_inputs")):
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
    call = dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if rewrites:  # an input adapter (prompt / P- / prefix tuning) rewrites what the model gets
        call = model.model_inputs(**call)
    hidden = backbone(**call).last_hidden_state  # (B, P + T, H); P = 0 unless virtual tokens were prepended
    batch, virtual = labels.shape[0], hidden.shape[1] - input_ids.shape[1]
    if virtual > 0:  # the last virtual position predicts token 0, position P + t predicts token t + 1 (as peft)
        ignored = labels.new_full((batch, virtual - 1), IGNORE_INDEX)
        targets = torch.cat((ignored, labels, labels.new_full((batch, 1), IGNORE_INDEX)), dim=1).reshape(-1)
        shifted = labels.reshape(-1)
    else:  # position t predicts token t + 1; the last position predicts nothing (it never reaches the head)
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # (B*T,)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*(P+T), H), a view
    return fused_linear_cross_entropy(flat, head.weight, head.bias, targets), (shifted != IGNORE_INDEX).sum()
