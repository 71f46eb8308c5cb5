"""Gated MLPs (`down(act(gate(x)) * up(x))`, Llama/Mistral/Qwen/Gemma...) that keep less for backward.

Autograd keeps three (tokens x intermediate) tensors per gated MLP for the backward of
`act(gate) * up`: the activation's input `gate`, its output `act(gate)` and `up`. Only `gate` and
`up` are needed: the activation is one cheap elementwise op, recomputed in backward. On Llama
shapes that is a third of the MLP's saved activations (5.4 MiB per layer at 1,024 tokens x 1,376).
An adapter on `down_proj` (LoRA's A, IA3's input scale) would keep the product itself, a fourth
such tensor; it is saved as a recipe over `gate` and `up` instead and recomputed when used.

`install(model)` swaps the forward of each module that has `gate_proj`, `up_proj`, `down_proj` and
`act_fn` for one that computes the product with `GatedProduct` — only after checking, on a small
random input in training mode, that the new forward gives the module's own output (a module whose
forward does anything else, e.g. dropout or a different wiring, is left alone). `uninstall(model)`
restores every swapped forward. Under `torch.compile` the lean forward computes the plain product:
the compiler's own partitioner decides what to keep and recompute, and saved-tensor hooks would
break its graph at every MLP.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


class GatedProduct(torch.autograd.Function):
    """act(gate) * up, saving only gate and up; act(gate) is recomputed in backward.

    `act=None` means SiLU, whose backward has a fused kernel (no autograd graph to rebuild)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor] | None):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return (F.silu(gate) if act is None else act(gate)) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.act is None:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if need_gate else None
            return grad_gate, grad * F.silu(gate) if need_up else None, None
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(need_gate)
            activated = ctx.act(leaf)
        grad_up = grad * activated.detach() if need_up else None
        grad_gate = torch.autograd.grad(activated, leaf, grad * up)[0] if need_gate else None
        return grad_gate, grad_up, None


def _lean_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.compiler.is_compiling():  # the compiler plans what to save and recompute itself
        return self.down_proj(self.act_fn(gate) * up)
    act = None if self.__dict__.get("_lean_silu") else self.act_fn
    product = GatedProduct.apply(gate, up, act)
    if not torch.is_grad_enabled() or _outer_hooks_active():
        return self.down_proj(product)  # no autograd, or someone else (checkpointing, offloading) owns saved tensors
    # What down_proj's adapters save of `product` (LoRA's A, IA3's scale keep their input) is
    # stored as a recipe over gate and up, which GatedProduct keeps anyway, and recomputed on use.
    recipe = _Recipe(gate.detach(), up.detach(), act or F.silu, product)
    with torch.autograd.graph.saved_tensors_hooks(recipe.pack, _unpack):
        return self.down_proj(product)


def _outer_hooks_active() -> bool:
    """Saved-tensor hooks are already installed (gradient checkpointing, CPU offloading): leave them be."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class _Recipe:
    """Saves views of one GatedProduct output as (gate, up, act, layout): no tensor of its own."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, act: Callable, product: torch.Tensor):
        self.gate, self.up, self.act = gate, up, act
        self.storage, self.dtype = product.untyped_storage().data_ptr(), product.dtype

    def pack(self, tensor: torch.Tensor):
        if tensor.untyped_storage().data_ptr() != self.storage or tensor.dtype != self.dtype:
            return tensor
        return (self, tuple(tensor.shape), tensor.stride(), tensor.storage_offset())

    def rebuild(self) -> torch.Tensor:
        with torch.no_grad():
            return self.act(self.gate) * self.up  # the product's own shape and layout


def _unpack(saved):
    if isinstance(saved, tuple) and len(saved) == 4 and isinstance(saved[0], _Recipe):
        recipe, shape, stride, offset = saved
        return recipe.rebuild().as_strided(shape, stride, offset)
    return saved


def _is_gated_mlp(module: nn.Module) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(part, nn.Module) for part in parts) and callable(getattr(module, "act_fn", None))


def _same_output(module: nn.Module) -> bool:
    """The module's own forward and the lean one agree on a random input (in training mode)."""
    weight = getattr(module.gate_proj, "weight", None)
    width = getattr(module.gate_proj, "in_features", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(width, int) or weight.device.type == "meta":
        return False
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    was_training = module.training
    try:
        module.train()
        generator = torch.Generator(device=weight.device).manual_seed(0)  # never the global RNG
        x = torch.randn(1, 3, width, device=weight.device, dtype=dtype, generator=generator)
        with torch.no_grad():
            own, lean = module(x), _lean_forward(module, x)
        if not isinstance(own, torch.Tensor) or own.shape != lean.shape:
            return False
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        return bool(torch.allclose(own.float(), lean.float(), atol=tolerance, rtol=tolerance))
    except Exception:  # anything unusual (quantized kernels, odd signatures): leave the module alone
        return False
    finally:
        module.train(was_training)


def _is_silu(act: Callable) -> bool:
    """`act` computes SiLU exactly (checked on a probe, not trusted by name)."""
    probe = torch.linspace(-8, 8, 257)
    try:
        with torch.no_grad():
            return bool(torch.equal(act(probe), F.silu(probe)))
    except Exception:
        return False


def install(model: nn.Module) -> int:
    """Give every gated MLP of `model` the lean forward; returns how many got it."""
    count = 0
    for module in model.modules():
        if "forward" in module.__dict__ or not _is_gated_mlp(module) or not _same_output(module):
            continue
        module._lean_silu = _is_silu(module.act_fn)
        module.forward = types.MethodType(_lean_forward, module)
        count += 1
    return count


def uninstall(model: nn.Module) -> None:
    """Give every gated MLP of `model` (or of a copy of it) its own forward back."""
    for module in model.modules():
        if "_lean_silu" in module.__dict__:
            module.__dict__.pop("forward", None)
            del module.__dict__["_lean_silu"]
