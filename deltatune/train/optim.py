"""AdamW over the trainable tensors, and the learning-rate schedule as a pure function of step.

LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): the B matrices learn `ratio` times
faster than A; with ratio 16 LoRA converges faster at the same cost. The schedule has no state
besides the step, so resume only needs the step.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

# Parameter names of LoRA's "B" side (linear and embedding layouts), for LoRA+.
_LORA_B = re.compile(r"(^|\.)lora_(embedding_)?B(\.|$)")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def build_optimizer(
    named: list[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float, loraplus_lr_ratio: float | None
) -> torch.optim.AdamW:
    """AdamW; with loraplus_lr_ratio the lora_B tensors form a group with lr * ratio."""
    if not named:
        raise ValueError("the model has no trainable parameters; was the adapter added before training?")
    groups = [{"params": [p for _, p in named], "lr_scale": 1.0}]
    if loraplus_lr_ratio is not None:
        is_b = [bool(_LORA_B.search(name)) for name, _ in named]
        groups = [
            {"params": [p for (_, p), b in zip(named, is_b) if not b], "lr_scale": 1.0},
            {"params": [p for (_, p), b in zip(named, is_b) if b], "lr_scale": float(loraplus_lr_ratio)},
        ]
        groups = [g for g in groups if g["params"]]
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    # On a GPU, the fused kernel: one launch per step instead of ~10 per tensor (a LoRA on every
    # linear layer of a 1B model has hundreds of tensors). Elsewhere the per-tensor loop. Both run
    # the same kernels in the same order on every run, which bit-identical resume relies on.
    params = [p for group in groups for p in group["params"]]
    fused = all(p.is_cuda and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    if fused:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=False)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr for the optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
