"""Adapter arithmetic: combine trained adapters into a new one (peft's `add_weighted_adapter`).

The maths are pure functions on tensors (first half of this file, peft's `merge_utils` with the same
names and results); `add_weighted_adapter` applies them layer by layer to a TunedModel's LoRA or
(IA)^3 adapters and adds the result as a new, inactive adapter.

Combination types (LoRA), as in peft:
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": combine the A factors and the B
  factors separately, each weighted by sqrt(|w * s|) (the sign on A only); all ranks must be equal.
- "cat": stack the factors (rank = sum of ranks); exact: the new update is sum_i w_i s_i B_i A_i.
- "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd": combine the dense
  updates s_i B_i A_i, then keep the top `svd_rank` singular triplets (default: the largest rank).
TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): keep the `density` fraction of largest
magnitudes, elect a sign per entry, average the entries that agree. DARE (Yu et al. 2023,
https://arxiv.org/abs/2311.03099): drop entries at random with probability 1 - density, rescale by
1 / density. The combined adapter has lora_alpha = r (scale 1), like peft's.

Randomness (DARE) is seeded and deterministic: draws come from a private torch.Generator seeded with
`seed`, never from the global RNG. peft draws from the global RNG after building the new adapter's
layers (whose initialisation consumes it too); our draws, in the same order and shapes, equal peft's
when the global RNG is seeded with the same value just before peft's first DARE draw.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from deltatune.core.config import ConfigError

if TYPE_CHECKING:
    from deltatune.core.tuned_model import TunedModel

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = FACTOR_METHODS + ("cat",) + SVD_METHODS
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Base methods (without "_svd") that read `density`."""


# -- pure maths: tensors in, tensors out -------------------------------------------------------------
def prune_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries, zero the rest."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    keep = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[keep[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def prune_random(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None, rescale: bool = True
) -> torch.Tensor:
    """Keep each entry with probability `density` (Bernoulli), divided by density when `rescale` (DARE)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """True where an entry's sign agrees with the elected sign over dim 0 ("total": sign of the sum,
    "frequency": the sign most entries have; ties go to +)."""
    sign = stacked.sign()
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    return sign == torch.where(magnitude >= 0, 1, -1)


def combine(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    method: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine same-shaped tensors by `method` (a FACTOR_METHODS name; "svd" means "linear")."""
    base = method.removesuffix("_svd") if method != "svd" else "linear"
    if base == "linear":
        pruned = tensors
    elif base in ("ties", "magnitude_prune"):
        pruned = [prune_magnitude(t, density) for t in tensors]
    elif base in ("dare_linear", "dare_ties"):
        pruned = [prune_random(t, density, generator) for t in tensors]
    else:
        raise ConfigError(f"unknown combination method {method!r}; one of {', '.join(COMBINATION_TYPES)}")
    stacked = torch.stack(pruned, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if base in ("ties", "dare_ties"):
        mask = majority_sign_mask(stacked, majority_sign_method)
        return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


def svd_factors(
    delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True, driver: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of the 2-D `delta` (B carries the singular
    values); `clamp` clips both to the `clamp` quantile of their entries, as peft does."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    b = u[:, :rank] @ torch.diag(s[:rank])
    a = vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b


# -- applied to a TunedModel ------------------------------------------------------------------------------
def _factors(module: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA delta's (A, B) parameters in peft's layout."""
    if hasattr(module, "lora_embedding_A"):
        return module.lora_embedding_A, module.lora_embedding_B
    return module.lora_A.weight, module.lora_B.weight


def _check(tuned: TunedModel, adapters: list[str], weights: list[float], adapter_name: str) -> str:
    if isinstance(adapters, str) or not adapters:
        raise ConfigError("adapters must be a non-empty list of adapter names")
    if len(weights) != len(adapters):
        raise ConfigError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    for name in adapters:
        if name not in tuned.adapters:
            raise ConfigError(f"no adapter named {name!r}; adapters: {sorted(tuned.adapters)}")
    if adapter_name in tuned.adapters:
        raise ConfigError(f"an adapter named {adapter_name!r} already exists; pick another name or delete it")
    tuners = {tuned.adapters[name].spec.name for name in adapters}
    if len(tuners) > 1 or not tuners <= {"lora", "ia3"}:
        raise ConfigError(
            f"add_weighted_adapter combines LoRA adapters or (IA)^3 adapters (one tuner at a time); got {sorted(tuners)}"
        )
    saved: dict[str, int] = {}
    for name in adapters:
        for module in tuned.adapters[name].saved_modules:
            saved[module] = saved.get(module, 0) + 1
    clashing = [module for module, count in saved.items() if count > 1]
    if clashing:
        raise ConfigError(
            f"adapters {adapters} each keep their own copy of {clashing[0]!r} (modules_to_save); such copies cannot be "
            "combined. Combine adapters that save different modules, or none"
        )
    kinds = {type(t.target_modules) for t in (tuned.adapters[n].config for n in adapters)}
    if len(kinds) > 1:
        raise ConfigError("the adapters' target_modules mix a regex string and a list; give them all in one form")
    return tuners.pop()


def _union(values: list[Any]) -> Any:
    if all(v is None for v in values):
        return None
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    return sorted(set().union(*(v or [] for v in values)))


def _rank_of(config: Any) -> int:
    return config.r if not config.rank_pattern else max(config.r, *config.rank_pattern.values())


def add_weighted_adapter(
    tuned: TunedModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str | None = None,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
) -> None:
    """See TunedModel.add_weighted_adapter."""
    from deltatune.core import inject

    adapters, weights = list(adapters), [float(w) for w in weights]
    tuner = _check(tuned, adapters, weights, adapter_name)
    configs = [tuned.adapters[name].config for name in adapters]
    if tuner == "ia3":
        if combination_type not in (None, "linear"):
            raise ConfigError(
                f"(IA)^3 adapters combine linearly only (as in peft); drop combination_type={combination_type!r}"
            )
        config = configs[0].replace(
            target_modules=_union([c.target_modules for c in configs]),
            feedforward_modules=_union([c.feedforward_modules for c in configs]),
        )
        tuned.add_adapter(adapter_name, config, _loading=True)
        with torch.no_grad():
            for _, wrapper in inject.delta_wrappers(tuned.model):
                if adapter_name not in wrapper.deltas:
                    continue
                target = wrapper.deltas[adapter_name].ia3_l
                target.zero_()
                for name, weight in zip(adapters, weights):
                    if name in wrapper.deltas:
                        target.add_(wrapper.deltas[name].ia3_l * weight)
        return

    method = "svd" if combination_type is None else combination_type
    if method not in COMBINATION_TYPES:
        raise ConfigError(f"combination_type must be one of {', '.join(COMBINATION_TYPES)}; got {method!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if len(adapters) == 1:
        method = "linear"  # peft: one adapter can only be scaled
    base = "linear" if method == "svd" else method.removesuffix("_svd")
    if base in NEEDS_DENSITY and (not isinstance(density, (int, float)) or not 0 < density <= 1):
        raise ConfigError(
            f"combination_type={method!r} needs density in (0, 1] (the fraction of entries kept); got {density!r}"
        )
    if any(c.use_dora for c in configs):
        raise ConfigError(
            "add_weighted_adapter cannot combine DoRA adapters (the magnitude vectors have no combination); use plain LoRA"
        )
    ranks = [_rank_of(c) for c in configs]
    if method in FACTOR_METHODS:
        if len(set(ranks)) != 1:
            raise ConfigError(
                f"combination_type={method!r} needs adapters of equal rank (got r={ranks}); use 'cat' or an '_svd' type"
            )
        new_rank = ranks[0]
    elif method == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    config = configs[0].replace(
        r=new_rank, lora_alpha=new_rank, target_modules=_union([c.target_modules for c in configs]),
        alpha_pattern={}, rank_pattern={},
    )  # fmt: skip
    wrappers = []
    for path, wrapper in inject.delta_wrappers(tuned.model):
        sources = [(name, w) for name, w in zip(adapters, weights) if name in wrapper.deltas]
        if sources:
            kinds = {type(wrapper.deltas[name]).__name__ for name, _ in sources}
            if not kinds <= {"LoraLinear", "LoraEmbedding", "LoraConv"}:
                raise ConfigError(f"add_weighted_adapter cannot combine LoRA on {path!r} ({sorted(kinds)})")
            if method in SVD_METHODS and "LoraConv" not in kinds:
                info = wrapper.layer_info
                if new_rank > min(info.in_features, info.out_features):
                    raise ConfigError(
                        f"svd_rank={new_rank} exceeds min(in, out) = {min(info.in_features, info.out_features)} of "
                        f"{path!r}; choose a smaller svd_rank"
                    )
        wrappers.append((wrapper, sources))
    tuned.add_adapter(adapter_name, config, _loading=True)
    generator = torch.Generator().manual_seed(int(seed))
    try:
        with torch.no_grad():
            for wrapper, sources in wrappers:
                if adapter_name in wrapper.deltas:
                    _fill(wrapper, adapter_name, sources, method, new_rank, density, majority_sign_method,
                          (svd_clamp, svd_full_matrices, svd_driver), generator)  # fmt: skip
    except BaseException:
        tuned.delete_adapter(adapter_name)
        raise


def _fill(wrapper, adapter_name, sources, method, new_rank, density, sign_method, svd_args, generator) -> None:
    """Write the combination of `sources` ((adapter, weight) pairs) into this layer's new adapter."""
    module = wrapper.deltas[adapter_name]
    target_a, target_b = _factors(module)
    target_a.zero_()
    target_b.zero_()
    if not sources:
        raise ConfigError("no adapter to combine on a layer the new adapter targets")
    if method == "cat":
        a = torch.cat([_factors(wrapper.deltas[n])[0] * w * wrapper.deltas[n].scale for n, w in sources], dim=0)
        b = torch.cat([_factors(wrapper.deltas[n])[1] for n, w in sources], dim=1)
        target_a[: a.shape[0]] = a
        target_b[:, : b.shape[1]] = b
        return
    if method in FACTOR_METHODS:
        weights_a, weights_b, factors_a, factors_b = [], [], [], []
        for name, weight in sources:
            scaled = weight * wrapper.deltas[name].scale
            root = math.sqrt(abs(scaled))
            weights_a.append(root if scaled >= 0 else -root)  # the sign on A only
            weights_b.append(root)
            a, b = _factors(wrapper.deltas[name])
            factors_a.append(a.data)
            factors_b.append(b.data)
        for target, factors, weights in ((target_a, factors_a, weights_a), (target_b, factors_b, weights_b)):
            combined = combine(factors, torch.tensor(weights), method, density, sign_method, generator)
            target.copy_(combined.to(target.dtype))
        return
    transposed = bool(getattr(wrapper.layer_info, "fan_in_fan_out", False))  # peft prunes GPT-2 Conv1D in (in, out)
    deltas = []
    for name, _ in sources:
        delta = wrapper.deltas[name].delta_weight()
        deltas.append(delta.T if transposed else delta)
    combined = combine(deltas, torch.tensor([w for _, w in sources]), method, density, sign_method, generator)
    if transposed:
        combined = combined.T
    if hasattr(module, "lora_embedding_A"):
        combined = combined.T  # (vocab, dim) -> (dim, vocab): B (dim, r), A (r, vocab)
    a, b = svd_factors(combined.flatten(1), new_rank, *svd_args)
    target_a.copy_(a.reshape(target_a.shape))
    target_b.copy_(b.reshape(target_b.shape))
