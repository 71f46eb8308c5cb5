"""convert_to_lora: any adapter with a weight-space form on linear layers, as a LoRA adapter (peft's API).

For each adapted linear layer the adapter's update is dW = merge(W) - W (the delta's own pure merge
function, so every delta tuner with a merge qualifies: LoRA/DoRA, IA3, LoHa, LoKr, ...). Its
truncated SVD dW ~= U_k S_k V_k^T gives B = U_k S_k (out, k) and A = V_k^T (k, in), with
lora_alpha = r so the scale is 1 (peft's convention). `rank` is an int (the same k everywhere) or
a float in (0, 1]: the smallest k whose singular values hold that fraction of the squared total,
per layer (written to rank_pattern / alpha_pattern). At full rank the conversion is exact.

Returns (LoraConfig, state dict under peft's file keys), like peft.convert_to_lora, so
`dt.set_peft_model_state_dict` / peft's loader take it as it is.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from deltatune import backends
from deltatune.core import inject
from deltatune.core.config import ConfigError
from deltatune.core.peft_api import KEY_PREFIX, _tuned_of
from deltatune.core.wrapper import replaces_parameters
from deltatune.tuners.lora import LoraConfig


def _cutoff(singular: torch.Tensor, threshold: float) -> int:
    """Smallest k with sum(S[:k]^2) >= threshold * sum(S^2) (at least 1)."""
    energy = torch.cumsum(singular.float() ** 2, 0)
    total = energy[-1]
    if total <= 0:
        return 1
    return int(torch.searchsorted(energy, threshold * total).item()) + 1


@torch.no_grad()
def convert_to_lora(
    model: nn.Module,
    rank: int | float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: dict | None = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """peft's `convert_to_lora(model, rank, adapter_name)`: the adapter's updates as a LoRA adapter.

    `progressbar` is accepted (no bar is drawn); `compile_kwargs` is refused (nothing here is compiled)."""
    if compile_kwargs is not None:
        raise ConfigError("convert_to_lora(compile_kwargs=...) is not supported; leave it None")
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank must be an int or a float threshold in (0, 1], got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(
            f"If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got {rank}."
        )
    if rank == 0:
        raise ValueError("Passing a rank of 0 doesn't make sense, please pass a valid value.")
    tuned = _tuned_of(model)
    if adapter_name not in tuned.adapters:
        raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {sorted(tuned.adapters)}")
    source = tuned.adapters[adapter_name].config
    if getattr(source, "bias", "none") != "none":
        raise ValueError(f"The adapter's config sets bias={source.bias}, this is not supported right now.")
    if isinstance(source, LoraConfig):
        warnings.warn(
            "Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need for that.",
            stacklevel=3,
        )
    layers = [(path, w) for path, w in inject.delta_wrappers(tuned.model) if adapter_name in w.deltas]
    unsupported = sorted(
        {
            type(w.deltas[adapter_name]).__name__
            for _, w in layers
            if w.layer_info.kind != "linear"
            or replaces_parameters(w.deltas[adapter_name])
            or not hasattr(w.deltas[adapter_name], "merge")
        }
    )
    if unsupported:
        raise TypeError(f"Some module types on this model do not support LoRA conversion: {', '.join(unsupported)}.")
    if not layers:
        raise TypeError("Could not detect any layer that supports LoRA conversion.")

    targets: list[str] = []
    patterns: dict[str, int] = {}
    state: dict[str, torch.Tensor] = {}
    for path, wrapper in layers:
        if adapter_name in wrapper.merged:
            raise ConfigError(f"adapter {adapter_name!r} is merged into {path!r}; unmerge_adapter() first")
        base = wrapper.base_layer
        weight = backends.read_weight(base).float()  # (out, in)
        bias = base.bias.detach().float() if getattr(base, "bias", None) is not None else None
        merged, new_bias, _ = wrapper.deltas[adapter_name].merge(weight, bias)
        if bias is not None and not torch.equal(new_bias, bias):
            raise TypeError(f"the adapter changes the bias of {path!r}, which LoRA cannot express")
        u, s, vh = torch.linalg.svd(merged - weight, full_matrices=False)  # (out, m), (m,), (m, in)
        k = rank if isinstance(rank, int) else _cutoff(s, rank)
        if k > s.shape[0]:
            raise ValueError(
                f"The chosen rank {k} is larger than the weight shape ({s.shape[0]}), please choose a lower rank."
            )
        if k != rank:
            patterns[path] = k
        targets.append(path)
        state[f"{KEY_PREFIX}{path}.lora_A.weight"] = vh[:k].contiguous()  # (k, in)
        state[f"{KEY_PREFIX}{path}.lora_B.weight"] = (u[:, :k] * s[:k]).contiguous()  # (out, k)
    r = rank if isinstance(rank, int) else 1
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=targets, rank_pattern=dict(patterns), alpha_pattern=dict(patterns),
        base_model_name_or_path=source.base_model_name_or_path, task_type=source.task_type,
    )  # fmt: skip
    return config, state
