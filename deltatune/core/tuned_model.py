"""TunedModel: a base model plus named adapters, with peft.PeftModel's methods.

The model keeps its own module tree; targets are wrapped in place (DeltaWrapper /
ModulesToSave). Which parameters train is derived, never stored: a parameter requires grad
exactly when it belongs to an active adapter that is not in inference mode.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.core import bypass_guard, inject, peft_api, rows
from deltatune.core.config import ConfigError, TunerConfig, check_adapter_name
from deltatune.core.hooks import HookSet
from deltatune.core.registry import TunerSpec, spec_for_config
from deltatune.core.wrapper import DeltaWrapper, MergeError, ModulesToSave, QuantizedMergeError
from deltatune.ops import fused_forward, gated_mlp

_AUTO_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"]}


class AdapterLoadError(ValueError):
    """Adapter tensors do not fit this model; the model was left unchanged."""


@dataclass
class Adapter:
    """One named adapter: its config, spec, and what it touched."""

    config: TunerConfig
    spec: TunerSpec
    targets: list[str] = field(default_factory=list)
    saved_modules: list[str] = field(default_factory=list)
    extra_params: list[str] = field(default_factory=list)
    undo: Any = None
    """What the spec's `connect` returned: called once this adapter's modules are removed."""


def _is_wrapped(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") or any(isinstance(m, (DeltaWrapper, ModulesToSave)) for m in model.modules())


class TunedModel(nn.Module):
    """A base model with one or more adapters. Build with `get_tuned_model` or `from_pretrained`."""

    merge_report: Any = None
    """The DequantizeReport of the last merge_and_unload(dequantize=True), else None."""
    fused_loss: bool = True
    """In training mode, `forward(..., labels=...)` on a causal LM computes the loss in chunks over the
    frozen head (deltatune/ops/fused_forward.py) and returns `logits=None`; False: the standard forward."""

    def __init__(
        self,
        model: nn.Module,
        config: TunerConfig | None,
        adapter_name: str = "default",
        *,
        lean_activations: bool = True,
        fused_loss: bool = True,
    ):
        super().__init__()
        if isinstance(model, TunedModel) or _is_wrapped(model):
            raise ConfigError(
                "this model is already wrapped by a tuner (deltatune or peft); add another adapter with "
                "tuned.add_adapter(name, config) instead of wrapping again, or unload() first"
            )
        self.model = model
        self.input_modules = nn.ModuleDict().train(model.training)
        """Tensors of "input" kind adapters (virtual tokens), by adapter name; they live outside the model."""
        self.training = model.training
        self.adapters: dict[str, Adapter] = {}
        self._active: list[str] = []
        self._disabled = False
        self.fused_loss = fused_loss
        for param in model.parameters():
            param.requires_grad_(False)
        # exact, and keeps a third less of each gated MLP's activations for backward (ops/gated_mlp.py)
        self._lean = bool(lean_activations and gated_mlp.install(model))
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    # -- attribute fall-through (config, device, generation_config, ...) ----------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- forward / generate ---------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward. `adapter_names` (peft's meaning): one adapter name per row,
        "__base__" for the base model; see deltatune.core.rows."""
        if adapter_names is not None:
            with self._mixed_rows(adapter_names):
                return self.forward(*args, **kwargs)
        found = self._active_input()
        if found is not None:
            spec, module = found
            kwargs = spec.prepare_inputs(self.model, _keywords(self.model.forward, args, kwargs), module, "forward")
            args = ()
        if self.fused_loss and self.training and kwargs.get("labels") is not None:  # see ops/fused_forward.py
            fused = fused_forward.fused_causal_lm_forward(self.model, _keywords(self.model.forward, args, kwargs))
            if fused is not None:
                return fused
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            with self._mixed_rows(adapter_names, rows.generate_expansion(self.model, kwargs)):
                return self.generate(*args, **kwargs)
        found = self._active_input()
        if found is None:
            return self.model.generate(*args, **kwargs)
        spec, module = found
        if len(args) == 1:  # generate(inputs, ...)
            args, kwargs = (), {"input_ids": args[0], **kwargs}
        kwargs = spec.prepare_inputs(self.model, _keywords(self.model.generate, args, kwargs), module, "generate")
        hooks = HookSet()  # each forward inside generate is rewritten too (prefill and decoding steps)
        hooks.pre_forward(
            self.model, lambda _, a, kw: (a, spec.prepare_inputs(self.model, kw, module, "step")), with_kwargs=True
        )
        try:
            return self.model.generate(**kwargs)
        finally:
            hooks.remove()

    def _active_input(self) -> tuple[TunerSpec, nn.Module] | None:
        """The active "input" kind adapter (its spec and module), or None (also while disabled)."""
        if self._disabled:
            return None
        held = self.__dict__.get("_row_plan")
        if held is not None:  # inside a call with adapter_names: the rows' own virtual tokens, or none
            return held[0]
        found = [a for a in self._active if a in self.input_modules]
        if len(found) > 1:
            raise ConfigError(f"adapters {found} all rewrite the model inputs; activate at most one of them at a time")
        return (self.adapters[found[0]].spec, self.input_modules[found[0]]) if found else None

    @contextlib.contextmanager
    def _mixed_rows(self, adapter_names: list[str], expand: int = 1) -> Iterator[None]:
        if self.__dict__.get("_row_plan") is not None:
            raise ConfigError("adapter_names was given twice (nested calls); give it once")
        with rows.mixed_rows(self.model, self.adapters, self.input_modules, adapter_names, expand) as plan:
            self.__dict__["_row_plan"] = (plan,)
            try:
                yield
            finally:
                self.__dict__["_row_plan"] = None

    def model_inputs(self, **kwargs: Any) -> dict[str, Any]:
        """The keyword arguments `forward(**kwargs)` hands the wrapped model: rewritten by the active
        input adapter (virtual-token embeddings, a prefix cache, a longer mask), else unchanged."""
        found = self._active_input()
        if found is None:
            return dict(kwargs)
        spec, module = found
        return spec.prepare_inputs(self.model, dict(kwargs), module, "forward")

    @property
    def rewrites_inputs(self) -> bool:
        """True while an active adapter rewrites the model's inputs (code that calls the inner model
        directly, like the fused loss, must then go through forward)."""
        return self._active_input() is not None

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with adapter layers in place)."""
        return self.model

    # -- adapters ------------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else ",".join(self._active)

    @property
    def peft_config(self) -> dict[str, TunerConfig]:
        return {name: adapter.config for name, adapter in self.adapters.items()}

    def add_adapter(
        self,
        adapter_name: str,
        config: TunerConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        *,
        _loading: bool = False,
    ) -> None:
        """Inject a new adapter (inactive until `set_adapter`), validating everything first.

        As in peft: target_modules=None takes the model type's defaults (models/peft_targets.py, logged);
        autocast_adapter_dtype=False keeps the adapter in its base layers' dtype instead of fp32;
        low_cpu_mem_usage is accepted (adapters here are small and built in place either way)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists; pick another name or delete it")
        if not isinstance(config, TunerConfig):
            raise ConfigError(f"expected a tuner config (e.g. LoraConfig), got {type(config).__name__}")
        spec = spec_for_config(config)
        peft_api.check_new_adapter(self.adapters, config)
        if spec.kind in ("delta", "side", "select"):
            from deltatune.models.peft_targets import fill_default_targets

            config = fill_default_targets(self.model, config)
        auto = _AUTO_HEADS.get(config.task_type or "")
        if auto:
            wanted = list(dict.fromkeys((config.modules_to_save or []) + auto))
            config = config.replace(modules_to_save=wanted)
        if spec.kind == "input":
            self._add_input_adapter(adapter_name, config, spec, _loading)
            return
        if spec.kind not in ("delta", "side", "select", "structural"):
            raise ConfigError(f"tuner kind {spec.kind!r} of {spec.name!r} is not supported by this TunedModel yet")
        if spec.kind == "structural":
            slots = inject.resolve_slots(self.model, spec, config)
        else:
            resolve = inject.resolve_selection if spec.kind == "select" else inject.resolve_targets
            config, targets = resolve(self.model, spec, config)
        undo = None
        try:
            if spec.kind == "structural":
                targets = inject.inject_slots(self.model, spec, config, adapter_name, *slots)
            elif spec.kind == "select":
                inject.inject_selected(self.model, spec, adapter_name, targets)
            else:
                inject.inject_deltas(self.model, spec, config, adapter_name, targets, run_init=not _loading)
            saved = inject.add_modules_to_save(self.model, config.modules_to_save, adapter_name) if config.modules_to_save else []
            undo = spec.connect(self.model, config, adapter_name, targets) if spec.connect else None
        except BaseException:
            inject.remove_adapter(self.model, adapter_name)
            if undo is not None:
                undo()
            raise
        extra = spec.extra_trainable(self.model, config, targets) if spec.extra_trainable else []
        self.adapters[adapter_name] = Adapter(config, spec, targets, saved, extra, undo)
        if not autocast_adapter_dtype:
            peft_api.cast_to_base_dtype(self.model, adapter_name)
        self._refresh()

    def _add_input_adapter(self, adapter_name: str, config: TunerConfig, spec: TunerSpec, loading: bool) -> None:
        """An "input" adapter: its module sits on this TunedModel; the model changes only by modules_to_save."""
        if spec.prepare is not None:
            config = spec.prepare(self.model, config, [])
        module = spec.build_input(self.model, config, loading)
        module.train(self.model.training)
        try:
            names = config.modules_to_save
            saved = inject.add_modules_to_save(self.model, names, adapter_name) if names else []
        except BaseException:
            inject.remove_adapter(self.model, adapter_name)
            raise
        self.input_modules[adapter_name] = module
        # the stack refuses raw token ids while this adapter is active (TRL calls it directly)
        self.adapters[adapter_name] = Adapter(config, spec, [], saved, undo=bypass_guard.install(self))
        self._refresh()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool | None = None) -> None:
        """Make one adapter (or several, composed) active; its parameters become trainable unless it
        is in inference mode (loaded with is_trainable=False). `inference_mode` (peft's argument) sets
        that mode for the named adapters first: True freezes them, False makes them trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.adapters:
                raise ConfigError(f"no adapter named {name!r}; adapters: {sorted(self.adapters)}")
        peft_api.check_modules_to_save(self.model, names)
        if inference_mode is not None:
            self.set_requires_grad(names, requires_grad=not inference_mode)
        self._active = names
        self._refresh()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """peft's set_requires_grad: make adapters trainable (or freeze them) by leaving (entering) inference
        mode; an adapter's tensors require grad while it is active and trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.adapters:
                raise ConfigError(f"no adapter named {name!r}; adapters: {sorted(self.adapters)}")
        for name in names:
            adapter = self.adapters[name]
            adapter.config = adapter.config.replace(inference_mode=not requires_grad)
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.adapters:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.adapters)}")
        if any(adapter_name in w.merged for _, w in inject.delta_wrappers(self.model)):
            raise ConfigError(f"cannot delete adapter {adapter_name!r} while it is merged; unmerge_adapter() first")
        inject.remove_adapter(self.model, adapter_name)
        if adapter_name in self.input_modules:
            del self.input_modules[adapter_name]
        undo = self.adapters.pop(adapter_name).undo
        if undo is not None:
            undo()
        self._active = [a for a in self._active if a != adapter_name]
        if not self._active and self.adapters:
            self._active = [next(iter(self.adapters))]
        self._refresh()

    def _refresh(self) -> None:
        """Push active/disabled state into the layers and derive requires_grad."""
        for _, wrapper in inject.delta_wrappers(self.model):
            wrapper.active = [a for a in self._active if a in wrapper.deltas]
            wrapper.disabled = self._disabled
        for _, saver in inject.save_wrappers(self.model):
            saver.active = next((a for a in self._active if a in saver.modules_to_save), None)
            saver.disabled = self._disabled
        # disabled: nothing trains (peft freezes the adapter inside disable_adapter() too)
        trainable = set() if self._disabled else {a for a in self._active if not self.adapters[a].config.inference_mode}
        owned = self._param_owners()
        for name, param in self.model.named_parameters():
            param.requires_grad_(bool(owned.get(name, set()) & trainable))
        for name, module in self.input_modules.items():
            module.requires_grad_(name in trainable)

    def _param_owners(self) -> dict[str, set[str]]:
        owners: dict[str, set[str]] = {}
        for name, _ in self.model.named_parameters():
            adapter = _adapter_of(name)
            if adapter is not None:
                owners.setdefault(name, set()).add(adapter)
        for adapter_name, adapter in self.adapters.items():
            for name in adapter.extra_params:
                owners.setdefault(name, set()).add(adapter_name)
        return owners

    def disable_adapter_layers(self) -> None:
        """peft's disable_adapter_layers: the base model's outputs until enable_adapter_layers()
        (merged adapters are unmerged first; nothing trains meanwhile)."""
        peft_api.warn_trained_biases(self.adapters, self._active)
        self.unmerge_adapter()
        self._disabled = True
        self._refresh()

    def enable_adapter_layers(self) -> None:
        """Undo disable_adapter_layers: the active adapters apply (and train) again."""
        self._disabled = False
        self._refresh()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes exactly what the base model computes (except base biases
        an adapter trained with bias != "none": those are the base's own tensors; a warning says so)."""
        peft_api.warn_trained_biases(self.adapters, self._active)
        merged = {name: list(w.merged) for name, w in inject.delta_wrappers(self.model) if w.merged}
        if merged:
            self.unmerge_adapter()
        self._disabled = True
        self._refresh()
        try:
            yield
        finally:
            self._disabled = False
            self._refresh()
            for name, adapters in merged.items():
                self.model.get_submodule(name).merge(adapters)

    # -- adapter arithmetic (deltatune/core/arithmetic.py) -------------------------------------------
    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str | None = None,
        svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
        svd_driver: str | None = None, density: float | None = None, majority_sign_method: str = "total",
        *, seed: int = 0,
    ) -> None:  # fmt: skip
        """peft's add_weighted_adapter: a new (inactive) adapter combining LoRA (or (IA)^3) adapters.
        combination_type (LoRA; default "svd"): linear, cat, svd, ties, ties_svd, dare_linear, dare_ties,
        dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd; DARE draws from a private
        generator seeded with `seed` (deterministic). (IA)^3 combines linearly. See core/arithmetic.py."""
        from deltatune.core import arithmetic

        arithmetic.add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_full_matrices,
            svd_driver, density, majority_sign_method, seed,
        )  # fmt: skip

    # -- merge -----------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, *, safe_merge: bool = True) -> None:
        """Fold adapters (default: the active ones) into the base weights; undo with unmerge_adapter.

        With safe_merge (default) a merge that would give NaN/inf raises MergeError and leaves
        every layer as it was."""
        names = adapter_names or self._active
        unmergeable = [n for n in names if n in self.adapters and not self.adapters[n].spec.mergeable]
        if unmergeable:
            spec = self.adapters[unmergeable[0]].spec
            raise MergeError(
                f"adapter(s) {unmergeable} ({spec.name}) cannot be merged into the base weights: the method has no "
                "weight-space form (it rewrites the model's inputs, is a nonlinear side path, or adds layers). Keep "
                "it unmerged, or unload() it; nothing was changed"
            )
        _refuse_quantized_merge(self.model, names)
        wrappers = [wrapper for _, wrapper in inject.delta_wrappers(self.model)]
        if not any(wrapper._pending(names) for wrapper in wrappers):
            warnings.warn(f"adapter(s) {names} are already merged; nothing to do", stacklevel=2)  # as peft warns
            return
        for wrapper in wrappers:  # deltas with no form in their layer's weight refuse before anything is written
            for name in wrapper._pending(names):
                check = getattr(wrapper.deltas[name], "check_mergeable", None)
                if check is not None:
                    check()
        if safe_merge:  # check every layer before writing any, so a refusal changes nothing
            for wrapper in wrappers:
                wrapper.check_merge(names)
        peft_api.untie_before_merge(self.model, wrappers, names)  # a tied head must not change with its embedding
        for wrapper in wrappers:
            wrapper.merge(names, safe=False)

    def unmerge_adapter(self) -> None:
        # Last merged, first unmerged: layers sharing a tied tensor each saved the value before theirs.
        for _, wrapper in reversed(list(inject.delta_wrappers(self.model))):
            wrapper.unmerge()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        *,
        safe_merge: bool = True,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
        probe_inputs: Any = None,
    ) -> nn.Module:
        """Merge (default: active adapters) and return the plain base model with them folded in.

        A quantized base (bitsandbytes 4-bit / 8-bit) is refused unless `dequantize=True`: then every
        quantized layer becomes a dense nn.Linear holding its dequantized weight, the adapters merge
        there, and the drift of the returned model's outputs from the quantized model with the adapter
        on `probe_inputs` (default: random token ids when the model has config.vocab_size) is logged
        and kept in `self.merge_report` (a DequantizeReport)."""
        names = adapter_names or self._active
        if dequantize:
            return self._merge_dequantized(names, safe_merge, probe_inputs)
        self.merge_adapter(names, safe_merge=safe_merge)
        return self._strip(keep_module_copies_of=names[0] if names else None)

    def _merge_dequantized(self, names: list[str], safe_merge: bool, probe_inputs: Any) -> nn.Module:
        from deltatune.core import dequantize as dq

        if names and names != self._active:
            self.set_adapter(names)
        if safe_merge:  # refuse non-finite merges before any layer is replaced
            for _, wrapper in inject.delta_wrappers(self.model):
                wrapper.check_merge(names)
        probe = probe_inputs if probe_inputs is not None else dq.default_probe(self.model)
        before = dq.probe_outputs(self, probe) if probe is not None else None
        dtype = dq.dense_dtype(self.model)
        replaced = inject.replace_quantized_layers(self.model, dtype)
        self.merge_adapter(names, safe_merge=False)
        merged = self._strip(keep_module_copies_of=names[0] if names else None)
        dq.forget_quantization(merged)
        drift = dq.measure_drift(before, dq.probe_outputs(merged, probe)) if before is not None else (None, None)
        self.merge_report = dq.DequantizeReport(replaced, dtype, *drift)
        dq.logger.warning(self.merge_report.summary())
        return merged

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; returns the original base model."""
        self.unmerge_adapter()
        return self._strip(keep_module_copies_of=None)

    def _strip(self, keep_module_copies_of: str | None) -> nn.Module:
        model = inject.unwrap_all(self.model, keep_module_copies_of=keep_module_copies_of)
        for param in model.parameters():
            param.requires_grad_(False)
        for adapter in reversed(list(self.adapters.values())):
            if adapter.undo is not None:
                adapter.undo()
        self.adapters.clear()
        self.input_modules.clear()
        self._active = []
        if self._lean:
            gated_mlp.uninstall(model)
            self._lean = False
        return model

    # -- parameters ------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a 4-bit packed parameter counts its real values."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel()
            if hasattr(param, "quant_state") or type(param).__name__ == "Params4bit":
                count *= 2
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- state -----------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """This adapter's tensors keyed as in the peft file (module path, no adapter name)."""
        name = adapter_name or self._active[0]
        adapter = self.adapters[name]
        out: dict[str, torch.Tensor] = {}
        extra = set(adapter.extra_params)
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for key, value in self.model.state_dict().items():
            tied = (value.data_ptr(), tuple(value.shape))
            if value.data_ptr() and tied in seen:  # a tensor tied across modules is saved once, first name
                continue
            seen.add(tied)
            file_key = _file_key(key, name)
            if file_key is not None:
                out[file_key] = value
            elif key in extra:
                out[key] = value
        if adapter.spec.file_keys is not None:  # tensors the tuner files under other keys (model-level ones)
            out = adapter.spec.file_keys(out, adapter.targets)
        if name in self.input_modules:  # keys of tensors outside the model, as peft names them
            out.update(self.input_modules[name].file_tensors())
        return out

    def _base_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if _adapter_of(k) is None}

    def load_adapter_state_dict(self, adapter_name: str, tensors: dict[str, torch.Tensor], *, source: str = "") -> None:
        """Strictly copy tensors into an adapter: exact key set, equal shapes; else nothing changes.

        Keys naming a frozen base tensor (peft saves embedding bases this way) are accepted only when
        they equal the model's own value: loading an adapter never overwrites base weights."""
        where = f" ({source})" if source else ""
        expected = self.adapter_state_dict(adapter_name)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            base = self._base_state()
            for key in list(unexpected):
                if key in base and base[key].shape == tensors[key].shape:
                    if not torch.allclose(base[key].float(), tensors[key].float(), atol=1e-6, rtol=1e-5):
                        raise AdapterLoadError(
                            f"adapter{where} holds base tensor {key!r} that differs from this model's; loading "
                            "it would overwrite base weights. Use the base model the adapter was trained on."
                        )
                    unexpected.remove(key)
        if missing or unexpected:
            raise AdapterLoadError(
                f"adapter{where} does not fit this model: missing keys {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}. Is it for another base model or target_modules?"
            )
        for key, target in expected.items():
            if tuple(tensors[key].shape) != tuple(target.shape):
                raise AdapterLoadError(
                    f"adapter{where}: tensor {key!r} has shape {tuple(tensors[key].shape)} in the file but "
                    f"{tuple(target.shape)} in the model; the adapter was made for a different base model or r"
                )
        held = self.input_modules[adapter_name].file_tensors() if adapter_name in self.input_modules else {}
        with torch.no_grad():
            for key, target in expected.items():
                if key not in held:
                    target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
        if held:
            self.input_modules[adapter_name].load_file_tensors({key: tensors[key] for key in held})

    # -- hub upload ------------------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        *,
        hub: str = "huggingface",
        private: bool = False,
        dry_run: bool = False,
        commit_message: str = "Upload adapter with deltatune",
        token: Any = None,
    ) -> Any:
        """Upload the adapters (PEFT format) with a generated model card to the Hugging Face hub or
        ModelScope; returns the UploadPlan (files, sizes, URL). The token comes from HF_TOKEN /
        `hf auth login` or MODELSCOPE_API_TOKEN / the modelscope login, never from an argument, so it
        cannot end up in code or notebooks. See deltatune/export/hub.py."""
        from deltatune.export.hub import push_adapter

        if token is not None:
            raise ConfigError(
                "push_to_hub takes no token argument: set HF_TOKEN / MODELSCOPE_API_TOKEN in the environment "
                "or log in with the hub's CLI"
            )
        return push_adapter(self, repo_id, hub=hub, private=private, dry_run=dry_run, commit_message=commit_message)

    # -- persistence -----------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """PEFT-format directory: "default" at the top, any other adapter in a subfolder of its name.

        peft's arguments keep peft's meaning: save_embedding_layers saves the input/output embedding
        tensors with the adapter ("auto": when targeted or resized), is_main_process=False writes nothing.
        `state_dict` (a state dict of this TunedModel) gives the values to save instead of the live ones.
        safe_serialization=False (a pickle file) and path_initial_model_for_weight_conversion are refused."""
        from deltatune.io import write_adapter

        method = "TunedModel.save_pretrained"
        refuse_value = peft_api.refuse_value
        refuse_value(method, "safe_serialization", safe_serialization, True, "deltatune writes only safetensors")
        refuse_value(
            method, "path_initial_model_for_weight_conversion", path_initial_model_for_weight_conversion, None,
            "converting a PiSSA/OLoRA adapter back to plain LoRA on save is not implemented; merge_and_unload() gives "
            "the full model",
        )  # fmt: skip
        state_dict = kwargs.pop("state_dict", None)  # peft: values to save instead of the live ones (Trainer, FSDP)
        peft_api.refuse_unknown(method, kwargs)
        if not is_main_process:
            return
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"save_directory {str(out)!r} is a file; give a directory")
        names = selected_adapters or list(self.adapters)
        from deltatune.io.provenance import base_fingerprint

        provenance = {"base_fingerprint": base_fingerprint(self.model), **getattr(self, "provenance", {})}
        for name in names:
            if name not in self.adapters:
                raise ConfigError(f"no adapter named {name!r}; adapters: {sorted(self.adapters)}")
            config = self.adapters[name].config
            base_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
            config = config.replace(inference_mode=True, base_model_name_or_path=config.base_model_name_or_path or base_path)
            folder = out if name == "default" else out / name
            bare = set(self.input_modules[name].file_tensors()) if name in self.input_modules else set()
            tensors = {**self.adapter_state_dict(name), **peft_api.embedding_tensors(self, name, save_embedding_layers)}
            if state_dict is not None:
                tensors = peft_api.values_from(self, self, name, tensors, bare, state_dict)
            write_adapter(folder, config, tensors, bare_keys=bare, provenance=provenance)

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        *,
        config: TunerConfig | None = None,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter (ours or peft's) under a new name; it is not activated.

        Config and tensors are read and checked before the model is touched; a failure leaves
        the model as it was. peft's arguments keep peft's meaning: `config` is used instead of the
        folder's adapter_config.json, `subfolder` reads model_id/subfolder, `key_mapping` renames file
        keys by regex, `torch_device` is where the file's tensors are staged, `autocast_adapter_dtype`
        as in add_adapter; `low_cpu_mem_usage` is accepted (same result). ephemeral_gpu_offload is refused."""
        from deltatune.io.peft_format import read_config, read_provenance, read_tensors, verify_weights

        method = "TunedModel.load_adapter"
        model_id = peft_api.split_subfolder(model_id, kwargs)
        peft_api.refuse_value(method, "ephemeral_gpu_offload", ephemeral_gpu_offload, False, "no offloading here")
        peft_api.refuse_unknown(method, kwargs, hint=" (hub arguments: download the adapter folder first)")
        check_adapter_name(adapter_name)
        if config is not None and not isinstance(config, TunerConfig):
            raise ConfigError(f"config must be a tuner config (e.g. LoraConfig), got {type(config).__name__}")
        config = (config if config is not None else read_config(model_id)).replace(inference_mode=not is_trainable)
        tensors = peft_api.apply_key_mapping(read_tensors(model_id), key_mapping)
        from deltatune.io import provenance

        provenance.warn_if_untrained(tensors, str(model_id))
        provenance.warn_if_other_base(read_provenance(model_id).get("base_fingerprint"), self.model, str(model_id))
        if torch_device is not None:
            tensors = {key: value.to(torch_device) for key, value in tensors.items()}
        config.warn_on_load(str(model_id))
        self.add_adapter(
            adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype,
            _loading=True,
        )  # fmt: skip
        try:
            self.load_adapter_state_dict(adapter_name, tensors, source=str(model_id))
            verify_weights(model_id)  # after the specific checks, which name a key when one fails
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self._refresh()

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: TunerConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> TunedModel:
        """Wrap `model` with an adapter saved by `save_pretrained` (or by peft).

        peft's arguments keep peft's meaning (see load_adapter); unknown ones raise TypeError."""
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        peft_api.refuse_unknown("TunedModel.from_pretrained", {k: v for k, v in kwargs.items() if k not in ("subfolder", "torch_device")})
        tuned = cls(model, None)
        try:
            tuned.load_adapter(
                model_id, adapter_name, is_trainable=is_trainable, config=config,
                autocast_adapter_dtype=autocast_adapter_dtype, ephemeral_gpu_offload=ephemeral_gpu_offload,
                low_cpu_mem_usage=low_cpu_mem_usage, key_mapping=key_mapping, **kwargs,
            )  # fmt: skip
        except BaseException:
            for name, param in model.named_parameters():
                param.requires_grad_(flags.get(name, param.requires_grad))
            raise
        tuned.set_adapter(adapter_name)
        if not is_trainable:
            tuned.eval()
        return tuned


def _keywords(fn: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments of a call to `fn`, by name, merged with its keyword arguments."""
    if not args:
        return dict(kwargs)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]
    if len(args) > len(names):
        raise TypeError(f"too many positional arguments ({len(args)}) for {getattr(fn, '__qualname__', fn)}")
    return {**dict(zip(names, args)), **kwargs}


_DELTA_KEY = re.compile(r"^(?P<path>.*)\.(?:deltas|modules_to_save)\.(?P<adapter>[^.]+)\.(?P<rest>.+)$")


def _adapter_of(key: str) -> str | None:
    found = _DELTA_KEY.match(key)
    return found.group("adapter") if found else None


def _file_key(key: str, adapter_name: str) -> str | None:
    found = _DELTA_KEY.match(key)
    if found is None or found.group("adapter") != adapter_name:
        return None
    return f"{found.group('path')}.{found.group('rest')}"


def _refuse_quantized_merge(model: nn.Module, names: list[str]) -> None:
    """Merging into 4-bit / 8-bit storage would requantize: silent error that unmerge cannot undo."""
    layers = [
        (path, w.layer_info.quantized)
        for path, w in inject.delta_wrappers(model)
        if w.layer_info.quantized and any(n in w.deltas and n not in w.merged for n in names)
    ]
    if layers:
        path, bits = layers[0]
        raise QuantizedMergeError(
            f"refusing to merge adapter(s) {names} into a quantized base: {len(layers)} target layer(s) store "
            f"their weights in {bits} (e.g. {path!r}), and merging would requantize them, silently adding "
            "quantization error. Use merge_and_unload(dequantize=True) to get a dense merged model (it reports "
            "the output drift), or keep the adapter unmerged."
        )


def get_tuned_model(
    model: nn.Module,
    config: TunerConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
    *,
    lean_activations: bool = True,
    fused_loss: bool = True,
) -> TunedModel:
    """Freeze `model` and inject an adapter described by `config`.

    peft's get_peft_model arguments keep peft's meaning: `autocast_adapter_dtype=False` keeps the
    adapter in the base layers' dtype (default: fp32 on a bf16/fp16 base), `revision` is recorded in the
    config, `low_cpu_mem_usage` is accepted (same result); `mixed=True` (PeftMixedModel) is refused:
    a TunedModel already holds adapters of different tuners.

    `lean_activations` (default on): gated MLPs (Llama-style `down(act(gate(x)) * up(x))`) recompute
    the activation in backward instead of keeping its output; same results, less memory. The
    original forwards come back on `unload()` / `merge_and_unload()`.

    `fused_loss` (default on): in training mode, `model(input_ids, labels=...)` on a causal LM with a
    frozen plain output head computes the same loss (and gradients) without building the
    full-vocabulary logits, and the output's `.logits` is None. Turn it off (here, or later with
    `tuned.fused_loss = False`) for code that reads `.logits` of a training forward with labels;
    eval mode and calls without labels always return logits."""
    peft_api.refuse_value("get_tuned_model", "mixed", mixed, False, "a TunedModel already mixes tuners (add_adapter)")
    if revision is not None:
        config = config.replace(revision=revision)
    if autocast_adapter_dtype and not low_cpu_mem_usage:
        return TunedModel(model, config, adapter_name, lean_activations=lean_activations, fused_loss=fused_loss)
    tuned = TunedModel(model, None, lean_activations=lean_activations, fused_loss=fused_loss)
    tuned.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype)
    tuned.set_adapter(adapter_name)
    return tuned
