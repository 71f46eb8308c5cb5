"""LoRA over a frozen linear layer as one autograd node: y = x W^T + b + s (d A^T) B^T, d = dropout(x).

Built from separate ops, autograd gives x two gradients, the base's `g W` and the adapter's
`(s g B) A`, in two (N, in) tensors that it then adds: a write and a read-read-write over an
activation-sized tensor per adapted layer. Here backward computes `g W` and adds `(s g B) A` into
it in place (one GEMM with beta = 1), and the cast of the fp32 master A and B to the activation
dtype happens inside the node (no cast nodes of their own). Forward is the same as the op-by-op
path: the base GEMM, then `x A^T`, then one `addmm_` into the fresh output.

Tried and dropped (no gain the H200 harness could see, and twice the bf16 gradient spread): writing
the thin product first and letting the base GEMM add into it with beta = 1, forward and backward.

Saved for backward: the layer input (the base matmul would keep it anyway), x A^T (N, r), the cast
A and B and a reference to W. Only for a frozen base (W and b without gradients) outside autocast;
LoraLinear falls back to the op-by-op path otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)`, skipping the call when it is one already (a per-layer, per-call saving)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dropped, weight, bias, lora_a, lora_b, scale: float):  # x, dropped: (N, in) or dropped None
        a, b = cast(lora_a, x.dtype), cast(lora_b, x.dtype)  # (r, in), (out, r)
        source = x if dropped is None else dropped
        out = F.linear(x, weight, bias)  # (N, out)
        xa = torch.mm(source, a.t())  # (N, r)
        out.addmm_(xa, b.t(), alpha=scale)
        ctx.scale, ctx.dtypes, ctx.dropped = scale, (lora_a.dtype, lora_b.dtype), dropped is not None
        ctx.save_for_backward(source, weight, a, b, xa)
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (N, out)
        source, weight, a, b, xa = ctx.saved_tensors
        need_x, need_dropped, _, _, need_a, need_b, _ = ctx.needs_input_grad
        grad_xa = torch.mm(grad, b).mul_(ctx.scale)  # (N, r): s g B
        grad_x = grad_dropped = grad_a = grad_b = None
        if need_x:
            grad_x = torch.mm(grad, weight)  # (N, in): g W
            if not ctx.dropped:
                grad_x.addmm_(grad_xa, a)  # + s g B A, in place
        if ctx.dropped and need_dropped:
            grad_dropped = torch.mm(grad_xa, a)
        if need_a:
            grad_a = cast(torch.mm(grad_xa.t(), source), ctx.dtypes[0])  # (r, in)
        if need_b:
            grad_b = cast(torch.mm(grad.t(), xa).mul_(ctx.scale), ctx.dtypes[1])  # (out, r)
        return grad_x, grad_dropped, None, None, grad_a, grad_b, None


def lora_linear(
    x: torch.Tensor,
    dropped: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """(N, out) = x W^T + b + scale * (d A^T) B^T with d = `dropped` (or x when None), as one node.

    x, dropped: (N, in) in the dtype of `weight`; weight (out, in) and bias frozen; lora_a (r, in)
    and lora_b (out, r) in any float dtype (their gradients come back in it).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("lora_linear needs a frozen base weight and bias")
    return LoraLinearFunction.apply(x, dropped, weight, bias, lora_a, lora_b, scale)
