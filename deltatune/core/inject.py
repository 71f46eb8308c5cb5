"""Apply and undo tuners on a model. This is the only code that replaces modules in a model.

The model as the user sees it: a DeltaWrapper shows as its base layer, a ModulesToSave as its
original module, so matching a second adapter gives the same names as the first.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from deltatune import backends
from deltatune.core import matching
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import ParamSite, TunerSpec
from deltatune.core.wrapper import DeltaWrapper, ModulesToSave, ParamOverride, Passthrough

_WRAPPERS = (DeltaWrapper, ModulesToSave)


def user_view(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) over the model with wrappers shown as the module they wrap."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, DeltaWrapper):
            yield path, child.base_layer
        elif isinstance(child, ModulesToSave):
            yield path, child.original_module
        else:
            yield path, child
            yield from user_view(child, path)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _output_head_name(model: nn.Module) -> str | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    for name, module in user_view(model):
        if module is head:
            return name
    return None


def resolve_targets(model: nn.Module, spec: TunerSpec, config: TunerConfig) -> tuple[TunerConfig, list[str]]:
    """Match a delta tuner's config to module names; return (config with expanded targets, names)."""
    view = dict(user_view(model))
    names = list(view)
    if config.target_modules is None:
        raise ConfigError(
            f"{type(config).__name__}.target_modules is not set; name the layers to adapt, e.g. "
            f"['q_proj', 'v_proj'] or 'all-linear'. Layers here: {matching.leaf_names(names)[:40]}"
        )
    if config.target_modules == "all-linear":
        linear = [n for n, m in view.items() if backends.is_linear_like(m) and not isinstance(m, _WRAPPERS)]
        linear = [n for n in linear if not matching.is_excluded(n, config)]
        config = config.replace(target_modules=matching.expand_all_linear(linear, _output_head_name(model)))
    match = matching.find_targets(names, config)
    matching.check_match(match, names, config)
    for name in match.targets:
        info = backends.describe(view[name])
        if "any" in spec.dispatch:  # the tuner takes any module and checks it itself (in prepare)
            continue
        if info is None or info.kind not in spec.dispatch:
            kind = info.kind if info else type(view[name]).__name__
            raise ConfigError(
                f"target module {name!r} is a {type(view[name]).__name__} ({kind}); tuner {spec.name!r} "
                f"supports layer kinds {list(spec.dispatch)}. Narrow target_modules to those layers."
            )
    if spec.prepare is not None:
        config = spec.prepare(model, config, match.targets)
    return config, match.targets


def inject_deltas(
    model: nn.Module, spec: TunerSpec, config: TunerConfig, adapter_name: str, targets: list[str], *, run_init: bool = True
) -> None:
    """Wrap each target (once) and add this adapter's delta to it."""
    assert spec.build is not None, f"delta tuner {spec.name} has no build()"
    for name in targets:
        module = model.get_submodule(name)
        wrapper = module if isinstance(module, DeltaWrapper) else None
        base = wrapper.base_layer if wrapper else module
        info = backends.describe(base) or backends.LayerInfo("other", 0, 0)
        delta = spec.build(config, info, name)
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor):
            weight = next(base.parameters(), None)
        device = weight.device if isinstance(weight, torch.Tensor) else None
        if device is not None and device.type != "meta":
            delta.to(device)
        delta.train(base.training)  # a new delta follows its host's train/eval mode (dropout)
        if wrapper is None:
            wrapper = DeltaWrapper(base, info)
            wrapper.train(base.training)
            _set_module(model, name, wrapper)
        wrapper.deltas[adapter_name] = delta
        init = getattr(delta, "init_from_base", None)
        if run_init and callable(init):
            init(lambda b=base: backends.read_weight(b), lambda w, b=base, n=name: _write_base(b, w, n))
    backends.prepare_for_training(model)


def resolve_slots(model: nn.Module, spec: TunerSpec, config: TunerConfig) -> tuple[str, list[int]]:
    """A "structural" tuner's layer list and the entries (indices among its original layers, i.e.
    not counting slots already inserted) after which it adds a layer."""
    assert spec.slots is not None, f"structural tuner {spec.name} has no slots()"
    list_path, after = spec.slots(model, config)
    layers = model.get_submodule(list_path)
    assert isinstance(layers, nn.ModuleList), f"{spec.name}.slots must name an nn.ModuleList, got {list_path!r}"
    originals = [i for i, m in enumerate(layers) if not _is_slot(m)]
    assert all(0 <= i < len(originals) for i in after), f"{spec.name}.slots gave indices outside the list: {after}"
    return list_path, sorted(set(after))


def _is_slot(module: nn.Module) -> bool:
    return isinstance(module, DeltaWrapper) and isinstance(module.base_layer, Passthrough)


def inject_slots(
    model: nn.Module, spec: TunerSpec, config: TunerConfig, adapter_name: str, list_path: str, after: list[int]
) -> list[str]:
    """Insert an empty slot after each chosen original layer (reusing one a previous adapter left there)
    and fill it with this adapter's delta, built from the layer it follows; returns the slot paths."""
    assert spec.build is not None, f"structural tuner {spec.name} has no build()"
    layers = model.get_submodule(list_path)
    originals = [i for i, m in enumerate(layers) if not _is_slot(m)]
    for index in sorted(after, reverse=True):  # back to front, so earlier positions stay valid
        position = originals[index] + 1
        template = layers[originals[index]]
        template = template.base_layer if isinstance(template, DeltaWrapper) else template
        if position < len(layers) and _is_slot(layers[position]):
            slot = layers[position]
        else:
            slot = DeltaWrapper(Passthrough(template), backends.LayerInfo("other", 0, 0))
            slot.train(template.training)
            layers.insert(position, slot)
        delta = spec.build(config, template, f"{list_path}.{position}")
        delta.train(template.training)
        slot.deltas[adapter_name] = delta
    return [f"{list_path}.{i}" for i, m in enumerate(layers) if _is_slot(m) and adapter_name in m.deltas]


def _drop(model: nn.Module, path: str, wrapper: DeltaWrapper) -> None:
    """Put the wrapped layer back, or take an emptied slot out of its list."""
    if isinstance(wrapper.base_layer, Passthrough):
        parent_path, _, index = path.rpartition(".")
        del model.get_submodule(parent_path)[int(index)]
    else:
        _set_module(model, path, wrapper.base_layer)


def _write_base(base: nn.Module, weight: torch.Tensor, name: str) -> None:
    """A tuner's init rewrites the base weight (PiSSA, OLoRA); quantized storage would only add error."""
    quantized = backends.describe(base).quantized
    if quantized:
        raise ConfigError(
            f"this initialisation rewrites the base weight of {name!r}, which is stored in {quantized}: requantizing "
            "the residual would add quantization error. Initialise on the dense base model, save the residual "
            "model, and quantize that instead (or use the default initialisation)."
        )
    backends.write_weight(base, weight)


def replace_quantized_layers(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Swap every quantized linear layer (wrapped or not) for a dense nn.Linear of `dtype` holding the
    dequantized weight; returns their paths. Delta wrappers keep their deltas around the dense layer."""
    found = [(name, module, backends.describe(module)) for name, module in user_view(model)]
    found = [(name, module, info) for name, module, info in found if info is not None and info.quantized]
    for name, module, info in found:  # check all before changing any
        if info.kind != "linear":
            raise TypeError(f"cannot dequantize {name!r}: no dense form for quantized {type(module).__name__}")
    for name, module, info in found:
        with torch.device("meta"):
            dense = nn.Linear(info.in_features, info.out_features, bias=getattr(module, "bias", None) is not None)
        dense.weight = nn.Parameter(backends.read_weight(module).to(dtype), requires_grad=False)
        if dense.bias is not None:
            dense.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        dense.train(module.training)
        holder = model.get_submodule(name)
        if isinstance(holder, DeltaWrapper):
            holder.base_layer, holder.layer_info = dense, backends.describe(dense)
        else:
            _set_module(model, name, dense)
    return [name for name, _, _ in found]


def param_sites(model: nn.Module) -> list[ParamSite]:
    """Every parameter as the user sees the model, once per module holding it (a tied tensor appears
    under each of its holders)."""
    sites: list[ParamSite] = []
    for module_name, module in [("", model), *user_view(model)]:
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            sites.append(ParamSite(name, module_name, module))
    return sites


def _own_param(site: ParamSite) -> nn.Parameter:
    return site.module._parameters[site.name.rpartition(".")[2]]


def _is_saved_in_full(module_name: str, modules_to_save: list[str]) -> bool:
    parts = module_name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p == key or p.endswith("." + key) for p in prefixes for key in modules_to_save)


def resolve_selection(model: nn.Module, spec: TunerSpec, config: TunerConfig) -> tuple[TunerConfig, list[str]]:
    """A "select" tuner's parameter names, with every holder of a tied tensor included and the
    modules trained in full (modules_to_save) left out; refuses parameters it cannot replace."""
    assert spec.select is not None, f"select tuner {spec.name} has no select()"
    sites = param_sites(model)
    chosen = spec.select(config, sites)
    by_name = {site.name: site for site in sites}
    unknown = [n for n in chosen if n not in by_name]
    assert not unknown, f"{spec.name}.select returned names that are not parameters: {unknown[:5]}"
    tensors = {id(_own_param(by_name[n])) for n in chosen}
    saved = config.modules_to_save or []
    names = [s.name for s in sites if id(_own_param(s)) in tensors and not _is_saved_in_full(s.module_name, saved)]
    if not names:
        raise ConfigError(
            f"{type(config).__name__} selected no parameter outside modules_to_save={saved!r}; "
            f"parameters here: {[s.name for s in sites][:40]}"
        )
    for name in names:
        site = by_name[name]
        holder = model.get_submodule(site.module_name) if site.module_name else model
        if not site.module_name or next(site.module.children(), None) is not None:
            raise ConfigError(
                f"parameter {name!r} is held by {site.module_name or 'the root module'!r} "
                f"({type(site.module).__name__}), which has submodules: {spec.name!r} replaces parameters of leaf "
                f"modules only. Leave it out (exclude_modules=[{site.module_name!r}] or a narrower selection)."
            )
        if isinstance(holder, ModulesToSave):
            raise ConfigError(
                f"parameter {name!r} belongs to {site.module_name!r}, which another adapter trains in full "
                "(modules_to_save); add it to this config's modules_to_save too, or leave it out"
            )
        if not _own_param(site).is_floating_point():
            raise ConfigError(f"parameter {name!r} is stored as {_own_param(site).dtype} (quantized?) and cannot train")
    if spec.prepare is not None:
        config = spec.prepare(model, config, names)
    return config, names


def inject_selected(model: nn.Module, spec: TunerSpec, adapter_name: str, names: list[str]) -> None:
    """Give each selected parameter a trainable per-adapter copy (one per tied tensor), used in place
    of the original by the holder's DeltaWrapper."""
    by_name = {site.name: site for site in param_sites(model)}
    copies: dict[int, nn.Parameter] = {}
    per_module: dict[str, dict[str, nn.Parameter]] = {}
    for name in names:
        site = by_name[name]
        param = _own_param(site)
        if id(param) not in copies:
            copies[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=False)
        per_module.setdefault(site.module_name, {})[name.rpartition(".")[2]] = copies[id(param)]
    for module_name, params in per_module.items():
        module = model.get_submodule(module_name)
        wrapper = module if isinstance(module, DeltaWrapper) else None
        base = wrapper.base_layer if wrapper else module
        if wrapper is None:
            wrapper = DeltaWrapper(base, backends.describe(base) or backends.LayerInfo("other", 0, 0))
            wrapper.train(base.training)
            _set_module(model, module_name, wrapper)
        delta = ParamOverride(params, store_as=spec.store_as)
        delta.train(base.training)
        wrapper.deltas[adapter_name] = delta


def add_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> list[str]:
    """Give each named module a trainable per-adapter copy; returns the module paths."""
    view = dict(user_view(model))
    paths = [n for n in view if any(n == key or n.endswith("." + key) for key in names)]
    if not paths:
        raise ConfigError(
            f"modules_to_save={names!r} matched no module; module names here: {matching.leaf_names(view)[:40]}"
        )
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, DeltaWrapper):
            raise ConfigError(f"{path!r} is both a tuner target and in modules_to_save; choose one")
        if not isinstance(module, ModulesToSave):
            training = module.training
            module = ModulesToSave(module)
            module.train(training)
            _set_module(model, path, module)
        module.add(adapter_name)
    return paths


def delta_wrappers(model: nn.Module) -> Iterator[tuple[str, DeltaWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, DeltaWrapper):
            yield name, module


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Drop one adapter's deltas and module copies; unwrap layers left with nothing."""
    for name, wrapper in reversed(list(delta_wrappers(model))):  # back to front: removing a slot shifts later ones
        if adapter_name in wrapper.deltas:
            if adapter_name in wrapper.merged:
                raise RuntimeError(f"adapter {adapter_name!r} is merged into {name}; unmerge it first")
            del wrapper.deltas[adapter_name]
            wrapper.active = [a for a in wrapper.active if a != adapter_name]
        if len(wrapper.deltas) == 0:
            _drop(model, name, wrapper)
    for name, saver in list(save_wrappers(model)):
        if adapter_name in saver.modules_to_save:
            del saver.modules_to_save[adapter_name]
            if saver.active == adapter_name:
                saver.active = None
        if len(saver.modules_to_save) == 0:
            _set_module(model, name, saver.original_module)


def unwrap_all(model: nn.Module, *, keep_module_copies_of: str | None = None) -> nn.Module:
    """Restore the plain module tree. With `keep_module_copies_of`, trained module copies of that
    adapter replace the originals (as merge_and_unload does)."""
    for name, wrapper in reversed(list(delta_wrappers(model))):
        _drop(model, name, wrapper)
    for name, saver in list(save_wrappers(model)):
        chosen = saver.original_module
        if keep_module_copies_of is not None and keep_module_copies_of in saver.modules_to_save:
            chosen = saver.modules_to_save[keep_module_copies_of]
        _set_module(model, name, chosen)
    return model
