"""Hotswap: replace a loaded LoRA adapter's weights in place, without re-injecting (peft.utils.hotswap).

The adapter keeps its name, its modules and its parameter objects: only their values change, so a
`torch.compile`d model keeps its graph. peft's names and meanings:

- `hotswap_adapter(model, path, adapter_name)` reads the adapter at `path` (same tuner, same target
  layers, compatible config) and copies its tensors into the loaded adapter `adapter_name`. A
  smaller rank is zero-padded into the existing tensors; layers the new adapter does not have are
  zeroed; a layer it has and the loaded one lacks is refused (that would need new modules).
- `prepare_model_for_compiled_hotswap(model, target_rank=R)`, called before compiling, pads every
  LoRA layer to rank R (zero rows / columns: outputs unchanged) so adapters of any rank <= R swap in.

Where peft turns each layer's scale into a tensor to swap it, the scale here stays a constant: a
new adapter's scale (its alpha / r) is folded into its B tensor instead (B' = B * new / old), which
gives the same outputs and leaves nothing for a compiled graph to re-trace. The adapter's config
is left as it was (as in peft), so `save_pretrained` afterwards writes an equivalent adapter with
the loaded one's r and alpha.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch

from deltatune.core.config import ConfigError

if TYPE_CHECKING:
    from deltatune.core.tuned_model import TunedModel

CONFIG_KEYS_TO_CHECK = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")
"""peft's: settings the tensors do not carry, which must agree between the two adapters."""
_RANK_LAST_ON = ("lora_B", "lora_embedding_B")
"""Factors whose rank is the second dimension (out, r); the A factors have it first (r, in)."""


def _tuned(model: Any) -> TunedModel:
    from deltatune.core.tuned_model import TunedModel

    inner = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps the module
    if not isinstance(inner, TunedModel):
        raise ConfigError(f"hotswap needs a TunedModel (or a compiled one), got {type(inner).__name__}")
    return inner


def _scale(config: Any, module_name: str) -> float:
    from deltatune.tuners.lora import _pattern_value

    r = int(_pattern_value(config.rank_pattern, module_name, config.r))
    alpha = float(_pattern_value(config.alpha_pattern, module_name, config.lora_alpha))
    return alpha / (math.sqrt(r) if config.use_rslora else r)


def _owner(wrappers: dict[str, Any], key: str) -> tuple[str, Any]:
    """The wrapper path a file key belongs to (the longest wrapper path that prefixes it)."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:end])
        if path in wrappers:
            return path, wrappers[path]
    raise KeyError(key)


def _rank_last(key: str) -> bool:
    return any(part in _RANK_LAST_ON for part in key.split("."))


def check_hotswap_configs_compatible(config0: Any, config1: Any) -> None:
    """Raise ConfigError unless both are LoRA configs agreeing on the settings tensors do not carry."""
    if config0.peft_type != config1.peft_type:
        raise ConfigError(
            f"cannot hotswap a {config1.peft_type} adapter into a {config0.peft_type} one; load it instead"
        )
    if config0.peft_type != "LORA":
        raise ConfigError(f"hotswap supports LoRA adapters only (as peft), not {config0.peft_type}; use load_adapter")
    for key in CONFIG_KEYS_TO_CHECK:
        if getattr(config0, key) != getattr(config1, key):
            raise ConfigError(
                f"cannot hotswap: {key} is {getattr(config1, key)!r} in the new adapter but {getattr(config0, key)!r} "
                "in the loaded one; load it as another adapter instead"
            )


def hotswap_adapter_from_state_dict(
    model: Any, state_dict: dict[str, torch.Tensor], adapter_name: str, config: Any, parameter_prefix: str = "lora_"
) -> None:
    """Copy `state_dict` (file keys, no adapter name) into the loaded adapter `adapter_name` in place.

    Everything is checked before any value changes; on an error the model is as it was."""
    from deltatune.core import inject

    tuned = _tuned(model)
    if adapter_name not in tuned.adapters:
        raise ConfigError(f"no adapter named {adapter_name!r} to hotswap; adapters: {sorted(tuned.adapters)}")
    check_hotswap_configs_compatible(tuned.adapters[adapter_name].config, config)
    wrappers = dict(inject.delta_wrappers(tuned.model))
    if any(adapter_name in w.merged for w in wrappers.values()):
        raise ConfigError(f"cannot hotswap adapter {adapter_name!r} while it is merged; unmerge_adapter() first")
    live = tuned.adapter_state_dict(adapter_name)
    unexpected = sorted(set(state_dict) - set(live))
    if unexpected:  # base tensors saved with the adapter (peft's save_embedding_layers) must equal the model's
        base = tuned._base_state()
        for key in list(unexpected):
            if key in base and base[key].shape == state_dict[key].shape:
                if not torch.allclose(base[key].float(), state_dict[key].float().to(base[key].device), atol=1e-6):
                    raise ConfigError(
                        f"cannot hotswap: the new adapter holds base tensor {key!r} that differs from this model's"
                    )
                unexpected.remove(key)
                state_dict = {k: v for k, v in state_dict.items() if k != key}
    if unexpected:
        raise ConfigError(
            f"cannot hotswap: the new adapter has tensors the loaded one lacks ({unexpected[:3]}"
            f"{' ...' if len(unexpected) > 3 else ''}); it targets other layers: load it with load_adapter instead"
        )
    missing = sorted(set(live) - set(state_dict))
    kept = [key for key in missing if parameter_prefix not in key]
    if kept:
        raise ConfigError(f"cannot hotswap: the new adapter lacks {kept[:3]} (not LoRA tensors, cannot be zeroed)")
    plan = []
    for key, new in state_dict.items():
        old = live[key]
        if old.shape != new.shape:
            rank_dim = 1 if _rank_last(key) else 0
            fits = old.dim() == new.dim() and all(
                o == n or (d == rank_dim and o > n) for d, (o, n) in enumerate(zip(old.shape, new.shape))
            )
            if not fits:
                raise ConfigError(
                    f"cannot hotswap {key!r}: shape {tuple(new.shape)} does not fit {tuple(old.shape)}; pad the loaded "
                    "adapter first with prepare_model_for_compiled_hotswap(model, target_rank=<largest rank>)"
                )
        factor = 1.0
        if _rank_last(key):
            path, wrapper = _owner(wrappers, key)
            factor = _scale(config, path) / wrapper.deltas[adapter_name].scale
        plan.append((old, new, factor))
    with torch.no_grad():
        for key in missing:
            live[key].zero_()
        for old, new, factor in plan:
            value = new.to(device=old.device, dtype=torch.float32) * factor
            if old.shape == new.shape:
                old.copy_(value)
            else:
                old.zero_()
                old[tuple(slice(0, n) for n in new.shape)].copy_(value)


def hotswap_adapter(
    model: Any, model_name_or_path: str | os.PathLike, adapter_name: str, torch_device: str | None = None, **kwargs: Any
) -> None:
    """Replace the weights of the loaded adapter `adapter_name` with those saved at `model_name_or_path`
    (ours or peft's), in place: same modules, same parameter objects, the name kept."""
    from deltatune.core import peft_api
    from deltatune.io.peft_format import read_config, read_tensors

    model_name_or_path = peft_api.split_subfolder(model_name_or_path, kwargs)
    peft_api.refuse_unknown("hotswap_adapter", kwargs, hint=" (hub arguments: download the adapter folder first)")
    config = read_config(model_name_or_path)
    tensors = read_tensors(model_name_or_path)
    if torch_device is not None:
        tensors = {key: value.to(torch_device) for key, value in tensors.items()}
    hotswap_adapter_from_state_dict(model, tensors, adapter_name, config)


def prepare_model_for_compiled_hotswap(
    model: Any, *, target_rank: int | None = None, config: Any = None, check_compiled: str = "error"
) -> None:
    """Pad every LoRA layer to `target_rank` (zeros: outputs unchanged, the same parameter objects),
    before torch.compile, so that adapters of any rank up to it hotswap without re-tracing.

    Each padded adapter's config gets r = target_rank and an alpha that keeps its scale, so it still
    saves and reloads as an equivalent adapter. `config` (peft's argument) is accepted and ignored:
    the TunedModel's own configs are updated."""
    from deltatune.core import inject

    if check_compiled not in ("error", "warn", "ignore"):
        raise ConfigError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if hasattr(model, "_orig_mod"):
        if check_compiled == "error":
            raise ConfigError("call prepare_model_for_compiled_hotswap before torch.compile, not after")
        if check_compiled == "warn":
            import warnings

            warnings.warn("prepare_model_for_compiled_hotswap on a compiled model: it will re-trace", stacklevel=2)
    tuned = _tuned(model)
    names = [name for name, adapter in tuned.adapters.items() if adapter.spec.name == "lora"]
    if not names:
        raise ConfigError(
            "no LoRA adapter on the model: load the first adapter before prepare_model_for_compiled_hotswap"
        )
    if target_rank is None:
        return
    if not isinstance(target_rank, int) or target_rank < 1:
        raise ConfigError(f"target_rank must be an integer >= 1, got {target_rank!r}")
    for name in names:
        scales = {}
        for path, wrapper in inject.delta_wrappers(tuned.model):
            module = wrapper.deltas[name] if name in wrapper.deltas else None
            if module is None:
                continue
            if module.r > target_rank:
                raise ConfigError(f"adapter {name!r} has r={module.r} on {path!r}, above target_rank={target_rank}")
            if getattr(module, "use_dora", False):
                raise ConfigError("prepare_model_for_compiled_hotswap does not pad DoRA adapters; use equal ranks")
            _pad(module, target_rank)
            scales[path] = module.scale
        config0 = tuned.adapters[name].config
        root = math.sqrt(target_rank) if config0.use_rslora else target_rank
        if len(set(scales.values())) <= 1:
            alpha = (next(iter(scales.values())) if scales else config0.lora_alpha / config0.r) * root
            new = config0.replace(r=target_rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={})
        else:  # per-layer scales: one exact alpha_pattern entry per layer
            import re

            pattern = {re.escape(path): scale * root for path, scale in scales.items()}
            new = config0.replace(r=target_rank, rank_pattern={}, alpha_pattern=pattern)
        tuned.adapters[name].config = new


def _pad(module: Any, rank: int) -> None:
    """Zero-pad one LoRA delta's factors to `rank`, keeping the parameter objects."""
    pairs = []
    if hasattr(module, "lora_embedding_A"):
        pairs.append((module.lora_embedding_A, module.lora_embedding_B))
    else:
        pairs.append((module.lora_A.weight, module.lora_B.weight))
        out_proj = getattr(getattr(module, "base_layer", None), "out_proj", None)
        if out_proj is not None:
            pairs.append((out_proj.lora_A.weight, out_proj.lora_B.weight))
    with torch.no_grad():
        for a, b in pairs:
            if a.shape[0] == rank:
                continue
            grown_a = a.new_zeros((rank,) + tuple(a.shape[1:]))
            grown_a[: a.shape[0]] = a
            grown_b = b.new_zeros((b.shape[0], rank) + tuple(b.shape[2:]))
            grown_b[:, : b.shape[1]] = b
            a.data, b.data = grown_a, grown_b
    module.r = rank
