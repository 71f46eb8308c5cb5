"""Name -> tuner spec. Adding a tuner is one file in tuners/ plus one line in `_BUILTIN_MODULES`.

Nothing outside a tuner's own file names that tuner: shared code asks the spec.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from deltatune.core.config import ConfigError, TunerConfig

Kind = Literal["delta", "input", "side", "select", "structural"]

# One line per built-in tuner module; each defines SPEC (or SPECS).
_BUILTIN_MODULES: tuple[str, ...] = (
    "deltatune.tuners.lora",
    "deltatune.tuners.ia3",
    "deltatune.tuners.bitfit",
    "deltatune.tuners.ln_tuning",
    "deltatune.tuners.part",
    "deltatune.tuners.full",
    "deltatune.tuners.adapter",
    "deltatune.tuners.restuning",
    "deltatune.tuners.side_tuning",
    "deltatune.tuners.llama_pro",
    "deltatune.tuners.prompt_tuning",
    "deltatune.tuners.p_tuning",
    "deltatune.tuners.prefix_tuning",
    "deltatune.tuners.loha",
    "deltatune.tuners.lokr",
    "deltatune.tuners.oft",
    "deltatune.tuners.boft",
    "deltatune.tuners.fourierft",
    "deltatune.tuners.hra",
    "deltatune.tuners.miss",
    "deltatune.tuners.c3a",
    "deltatune.tuners.delora",
    "deltatune.tuners.road",
    "deltatune.tuners.gralora",
    "deltatune.tuners.shira",
    "deltatune.tuners.vera",
    "deltatune.tuners.randlora",
    "deltatune.tuners.vblora",
    "deltatune.tuners.waveft",
    "deltatune.tuners.hira",
    "deltatune.tuners.pvera",
    "deltatune.tuners.peanut",
    "deltatune.tuners.beft",
    "deltatune.tuners.deft",
    "deltatune.tuners.supertuning",
    "deltatune.tuners.glora",
    "deltatune.tuners.cartridge",
    "deltatune.tuners.unilora",
    "deltatune.tuners.trainable_tokens",
)


@dataclass(frozen=True)
class ParamSite:
    """One parameter as the user sees the model: what a "select" tuner chooses from."""

    name: str
    """Dotted parameter name, e.g. "model.layers.0.input_layernorm.weight"."""
    module_name: str
    """Name of the module that holds it directly ("" for the root)."""
    module: nn.Module
    """That module (its type tells e.g. a norm layer)."""


@dataclass(frozen=True)
class TunerSpec:
    """Everything shared code needs to know about a tuner.

    Delta tuners give `build(config, layer_info, module_name) -> nn.Module` and the layer kinds
    they accept (`dispatch`); "select" tuners give `select(config, sites) -> parameter names`, and
    shared code trains per-adapter copies of those parameters in their place; other kinds give an
    `attach(model, config, adapter_name) -> Attachment` that owns its own injection (see
    deltatune.core.inject). "side" tuners are delta tuners whose deltas also read activations tapped
    elsewhere in the model (hooks registered by `connect`). "structural" tuners add layers: `slots`
    says where, and `build(config, template_module, slot_name)` gives each new slot's delta.
    """

    name: str
    kind: Kind
    config: type[TunerConfig]
    peft_type: str
    dispatch: tuple[str, ...] = ()
    build: Callable[..., nn.Module] | None = None
    attach: Callable[..., Any] | None = None
    prepare: Callable[[nn.Module, TunerConfig, list[str]], TunerConfig] | None = None
    """Optional: adjust a config once targets are known (e.g. set fan_in_fan_out for Conv1D)."""
    extra_trainable: Callable[[nn.Module, TunerConfig, list[str]], list[str]] | None = None
    """Optional: names of base parameters this tuner also trains and saves (e.g. LoRA bias="all")."""
    select: Callable[[TunerConfig, list[ParamSite]], list[str]] | None = None
    """"select" kind: names of the parameters to train (raise ConfigError, listing real names, if none)."""
    store_as: str = ""
    """"select" kind: file keys are "<module>.<store_as>.<param>" when set, else "<module>.<param>"."""
    connect: Callable[[nn.Module, TunerConfig, str, list[str]], Callable[[], None]] | None = None
    """Optional: after the adapter's deltas are in place, wire up what else it needs (hooks tapping other
    modules, model bookkeeping such as a layer count); returns the undo, run once the adapter's modules
    have been removed (delete_adapter, unload, merge_and_unload)."""
    slots: Callable[[nn.Module, TunerConfig], tuple[str, list[int]]] | None = None
    """"structural" kind: (path of an nn.ModuleList, indices of its entries after which a new layer is
    inserted); raise ConfigError saying why when the model has no such list."""
    file_keys: Callable[[dict[str, Any], list[str]], dict[str, Any]] | None = None
    """Optional: `(tensors, targets) -> tensors` renames an adapter's tensors (keyed by module path) to the file's
    keys. A key "base_model.<name>" is a tensor peft keeps once per adapter at model level (VeRA's shared
    projections); it is written as is. Loading copies each file key into the tensor its key names."""
    mergeable: bool = True
    """False when the adapter has no weight-space form (nonlinear or added layers): merge_adapter refuses it."""
    identity_at_init: bool = True
    """False when a fresh adapter changes the output by design (the tuner's docstring says why)."""
    build_input: Callable[[nn.Module, TunerConfig, bool], nn.Module] | None = None
    """"input" kind: `(model, config, for_loading) -> module` holding the adapter's tensors (kept on the
    TunedModel, not in the model). The module gives `file_tensors() -> {file key: tensor}` (what the file
    holds) and `load_file_tensors(tensors)`; with for_loading it is built in the form the file restores."""
    prepare_inputs: Callable[[nn.Module, dict[str, Any], nn.Module, str], dict[str, Any]] | None = None
    """"input" kind: `(model, kwargs, module, stage) -> kwargs` rewrites a call's keyword arguments. stage is
    "forward" (a TunedModel forward), "generate" (generate()'s own arguments, once) or "step" (each model
    forward inside generate, seen through a forward pre-hook)."""
    example_configs: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    """Configs the contract test matrix runs (target_modules is filled in per model for delta tuners;
    "select" and "structural" tuners, and examples naming their own target_modules, run as given, on
    every model where they apply)."""
    paper: str = ""
    contract_models: tuple[str, ...] = ()
    """Tiny models (deltatune.testing.tiny_models names) the contract matrix runs this tuner on; empty:
    every compatible one. A tuner whose math does not depend on the model family may name the few models
    that exercise each layer kind it adapts, to keep the matrix's time in check."""


_REGISTRY: dict[str, TunerSpec] = {}
_BY_PEFT_TYPE: dict[str, TunerSpec] = {}
_loaded = False


def register(spec: TunerSpec) -> TunerSpec:
    """Add a tuner (built-ins register at import; users may register their own)."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"a tuner named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    _BY_PEFT_TYPE.setdefault(spec.peft_type, spec)
    return spec


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module_name in _BUILTIN_MODULES:
        module = importlib.import_module(module_name)
        specs: Sequence[TunerSpec] = getattr(module, "SPECS", None) or [module.SPEC]
        for spec in specs:
            register(spec)


def get_spec(name: str) -> TunerSpec:
    """Spec by registry name (case-insensitive); unknown names list the known ones."""
    _load_builtins()
    spec = _REGISTRY.get(name.lower()) if isinstance(name, str) else None
    if spec is None:
        from deltatune.suggest import did_you_mean

        hint = did_you_mean(name, _REGISTRY)
        raise ConfigError(f"unknown tuner {name!r}; {hint}known tuners: {', '.join(sorted(_REGISTRY))}")
    return spec


def spec_for_config(config: TunerConfig) -> TunerSpec:
    """Spec owning a config instance."""
    _load_builtins()
    for spec in _REGISTRY.values():
        if type(config) is spec.config:
            return spec
    raise ConfigError(f"{type(config).__name__} is not the config of any registered tuner")


def spec_for_saved(data: dict[str, Any], source: str) -> TunerSpec:
    """Spec for a saved config dict: our 'tuner' key wins, else peft's 'peft_type'."""
    _load_builtins()
    if isinstance(data.get("tuner"), str):
        return get_spec(data["tuner"])
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ConfigError(f"{source}: no 'peft_type' field; this is not an adapter config")
    spec = _BY_PEFT_TYPE.get(str(peft_type).upper())
    if spec is None:
        known = ", ".join(sorted(_BY_PEFT_TYPE))
        raise ConfigError(f"{source}: peft_type={peft_type!r} is not supported by deltatune (supported: {known})")
    return spec


def all_specs() -> list[TunerSpec]:
    _load_builtins()
    return list(_REGISTRY.values())
