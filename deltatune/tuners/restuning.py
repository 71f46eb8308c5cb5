"""Res-Tuning-Bypass: a chain of small residual tuners fed by detached taps of the frozen backbone.

    z_0 = stopgrad(root)                                   (the root module's input or output)
    z_i = lateral_i(stopgrad(s_i)) + vertical_i(z_{i-1}),  i = 1..L  (s_i: output of stem block i)
    target input (or output) := z_L

Jiang et al., NeurIPS 2023, https://arxiv.org/abs/2310.19859 ("unbinding tuners from the
backbone"). Each lateral/vertical tuner is a residual adapter t(z) = z + W2 act(W1 z + b1) + b2
(`tuner_cfg` "res_adapter", bottleneck `adapter_length`), or "zero" (t(z) = 0). The backbone is only
ever *read*: forward hooks (a HookSet) tap the root and stem activations detached, so no gradient
flows into the backbone and none of its activations are kept for backward; the backbone output the
bypass replaces is discarded. Gradients run from the loss through the (frozen) target and whatever
follows it (the head) into the bypass only, which is where the memory saving over LoRA comes from:
backward never visits the backbone's blocks.

Not identity at init: z_L replaces the target's input (or output), and a fresh bypass computes
roughly the sum of the root and stem activations, not the backbone's output (the paper's design;
`zero_init_last` zeroes the last block's W2, as in ms-swift). Not mergeable (a side network).

Fields follow ms-swift's ResTuningConfig: `root_modules` (regex, first match; unset: the first
stem's input), `root_modules_hook`, `stem_modules` (regex or exact names, in model order),
`stem_modules_hook`, `target_modules` (must select exactly one module), `target_modules_hook`
("input": z_L replaces the target's first input; "output": its output), `dims` (width of the tapped
activations; unset: the model config's hidden_size), `tuner_cfg`, `zero_init_last`. Upsampling
(ms-swift's `use_upsample`, for U-Nets) is not implemented.
The file is deltatune's own: keys "<target>.bypass_blocks.<i>.{lateral,vertical}.{ln1,ln2}.*".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core import matching
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.hooks import HookSet
from deltatune.core.inject import user_view
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall

HOOKS = ("input", "output")
TUNERS = ("res_adapter", "zero")


@dataclass(kw_only=True)
class ResTuningConfig(TunerConfig):
    """Configuration of Res-Tuning-Bypass (field names are ms-swift's)."""

    tuner_name = "restuning"
    peft_type = "RESTUNING"
    run_defaults = {  # every block feeds the bypass, which replaces the final norm's input
        "stem_modules": r".*\.(layers|h|layer|blocks)\.\d+",
        "target_modules": r"(model\.norm|transformer\.ln_f|vit\.layernorm)",
    }

    dims: list[int] | int | None = None
    """Width of the tapped activations (one per stem, all equal); unset: the model config's hidden_size."""
    root_modules: str | None = None
    """Regex (whole name); the first matching module's input/output starts the bypass. Unset: the first
    stem's input."""
    root_modules_hook: str = "input"
    """Tap the root module's "input" or "output"."""
    stem_modules: list[str] | str | None = None
    """The backbone blocks feeding the lateral tuners: a regex (whole name) or exact names / name suffixes."""
    stem_modules_hook: str = "output"
    """Tap each stem's "input" or "output"."""
    target_modules_hook: str = "input"
    """"input": the bypass output replaces the target's first input; "output": it replaces its output."""
    tuner_cfg: dict[str, Any] | str = "res_adapter"
    """"res_adapter", {"res_adapter": {"adapter_length": n}}, "zero", or {"lateral_cfg": one of those,
    "vertical_cfg": one of those}."""
    zero_init_last: bool = False
    """Zero-initialize the last bypass block's output weights."""

    def validate(self) -> None:
        super().validate()
        if self.stem_modules is None:
            raise ConfigError("stem_modules is not set; give the backbone blocks to tap, e.g. r'.*\\.layers\\.\\d+'")
        for name in ("root_modules_hook", "stem_modules_hook", "target_modules_hook"):
            if getattr(self, name) not in HOOKS:
                raise ConfigError(f"{name} must be 'input' or 'output', got {getattr(self, name)!r}")
        if isinstance(self.stem_modules, str):
            _check_regex("stem_modules", self.stem_modules)
        elif not isinstance(self.stem_modules, list) or not all(isinstance(v, str) and v for v in self.stem_modules):
            raise ConfigError(f"stem_modules must be a regex or a list of module names, got {self.stem_modules!r}")
        if self.root_modules is not None:
            _check_regex("root_modules", self.root_modules)
        dims = [self.dims] if isinstance(self.dims, int) else self.dims
        if dims is not None and (not isinstance(dims, list) or not all(isinstance(d, int) and d > 0 for d in dims)):
            raise ConfigError(f"dims must be a positive integer or a list of them, got {self.dims!r}")
        if dims is not None and len(set(dims)) > 1:
            raise ConfigError(f"dims must all be equal (no upsampling between bypass blocks), got {self.dims!r}")
        lateral, vertical = split_tuner_cfg(self.tuner_cfg)
        if adapter_length(lateral) is None and adapter_length(vertical) is None:
            raise ConfigError(f"tuner_cfg={self.tuner_cfg!r} makes every tuner 'zero'; nothing would train")
        if not isinstance(self.zero_init_last, bool):
            raise ConfigError(f"zero_init_last must be True or False, got {self.zero_init_last!r}")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{name}={pattern!r} is not a valid regular expression: {exc}") from None


def split_tuner_cfg(tuner_cfg: Any) -> tuple[Any, Any]:
    """(lateral, vertical) tuner settings from ms-swift's tuner_cfg forms."""
    if isinstance(tuner_cfg, dict) and ("lateral_cfg" in tuner_cfg or "vertical_cfg" in tuner_cfg):
        return tuner_cfg.get("lateral_cfg", "zero"), tuner_cfg.get("vertical_cfg", "zero")
    return tuner_cfg, tuner_cfg


def adapter_length(cfg: Any) -> int | None:
    """Bottleneck width of a "res_adapter" setting, None for "zero"; ConfigError for anything else."""
    if cfg == "zero":
        return None
    if cfg == "res_adapter":
        return 10
    if isinstance(cfg, dict) and set(cfg) == {"res_adapter"} and isinstance(cfg["res_adapter"], dict):
        length = cfg["res_adapter"].get("adapter_length", 10)
        if isinstance(length, int) and length > 0 and set(cfg["res_adapter"]) <= {"adapter_length"}:
            return length
    raise ConfigError(
        f"tuner_cfg entry {cfg!r} is not supported; use 'res_adapter', {{'res_adapter': {{'adapter_length': n}}}}, "
        "'zero', or {'lateral_cfg': ..., 'vertical_cfg': ...} of those"
    )


# ---------------------------------------------------------------------------------------------
# Math modules: tensors and plain numbers only.
# ---------------------------------------------------------------------------------------------
class ResAdapter(nn.Module):
    """z + W2 act(W1 z + b1) + b2 over the last dimension (or 0 when `length` is None)."""

    def __init__(self, dim: int, length: int | None, *, zero_last: bool):
        super().__init__()
        self.is_zero = length is None
        if self.is_zero:
            return
        self.ln1 = nn.Linear(dim, length)
        self.act = nn.GELU()
        self.ln2 = nn.Linear(length, dim)
        for layer in (self.ln1, self.ln2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6)
        if zero_last:
            nn.init.zeros_(self.ln2.weight)
            nn.init.zeros_(self.ln2.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor | float:
        if self.is_zero:
            return 0.0
        return z + self.ln2(self.act(self.ln1(z)))  # (..., dim)


class BypassBlock(nn.Module):
    def __init__(self, dim: int, lateral: int | None, vertical: int | None, *, zero_last: bool):
        super().__init__()
        self.lateral = ResAdapter(dim, lateral, zero_last=zero_last)
        self.vertical = ResAdapter(dim, vertical, zero_last=zero_last)

    def forward(self, stem: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.lateral(stem) + self.vertical(z)  # (..., dim)


class ResTuningBypass(nn.Module):
    """The bypass network at the target; `taps` (set by connect) holds the detached activations."""

    def __init__(self, dim: int, depth: int, lateral: int | None, vertical: int | None, *, zero_init_last: bool,
                 replace_input: bool):  # fmt: skip
        super().__init__()
        self.bypass_blocks = nn.ModuleList(
            BypassBlock(dim, lateral, vertical, zero_last=zero_init_last and i == depth - 1) for i in range(depth)
        )
        self.replace_input = replace_input
        self.taps: dict[Any, torch.Tensor] = {}
        self.stem_names: list[str] = []

    def bypass(self) -> torch.Tensor:
        missing = [name for i, name in enumerate(self.stem_names) if i not in self.taps]
        if missing or "root" not in self.taps:
            raise RuntimeError(
                f"ResTuning: stem module(s) {missing or self.stem_names[:1]} did not run before the target module; "
                "stem_modules must be backbone blocks that run before target_modules"
            )
        dtype = next(self.parameters()).dtype  # the bypass stays fp32 on low-precision backbones
        z = self.taps.pop("root").to(dtype)
        for i, block in enumerate(self.bypass_blocks):
            z = block(self.taps.pop(i).to(dtype), z)  # (..., dim)
        return z

    def forward(self, x: torch.Tensor, base: BaseCall) -> Any:
        if self.replace_input:
            return base(self.bypass().to(x.dtype))  # the backbone's own input to the target is dropped
        with torch.no_grad():
            result = base(x)
        z = self.bypass()
        if isinstance(result, tuple):
            return (z.to(result[0].dtype), *result[1:])
        return z.to(result.dtype)


# ---------------------------------------------------------------------------------------------
# The one place ResTuningConfig is read.
# ---------------------------------------------------------------------------------------------
def build(config: ResTuningConfig, info: LayerInfo, module_name: str) -> nn.Module:
    lateral, vertical = split_tuner_cfg(config.tuner_cfg)
    dim = config.dims if isinstance(config.dims, int) else config.dims[0]
    return ResTuningBypass(
        dim, len(config.stem_modules), adapter_length(lateral), adapter_length(vertical),
        zero_init_last=config.zero_init_last, replace_input=config.target_modules_hook == "input",
    )  # fmt: skip


def prepare(model: nn.Module, config: ResTuningConfig, targets: list[str]) -> ResTuningConfig:
    """Check the target, resolve stems (written as exact names, in model order) and dims."""
    if len(targets) != 1:
        raise ConfigError(
            f"ResTuning target_modules must select exactly one module (where the bypass joins), got {targets}"
        )
    names = [name for name, _ in user_view(model)]
    found = matching.find_targets(names, config, config.stem_modules)
    if not found.targets:
        raise ConfigError(matching.explain(names, config.stem_modules, config, field_name="stem_modules"))
    if targets[0] in found.targets or any(targets[0].startswith(s + ".") for s in found.targets):
        raise ConfigError(
            f"ResTuning target {targets[0]!r} is one of (or inside) the stem_modules; it must run after them"
        )
    changes: dict[str, Any] = {"stem_modules": found.targets}
    if config.root_modules is not None and not any(matching.is_target(n, config, config.root_modules) for n in names):
        raise ConfigError(matching.explain(names, config.root_modules, config, field_name="root_modules"))
    dims = config.dims
    if dims is None:
        dims = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(dims, int):
            raise ConfigError("ResTuning cannot tell the width of the stem activations: set ResTuningConfig.dims")
        changes["dims"] = dims
    elif isinstance(dims, list) and len(dims) != len(found.targets):
        raise ConfigError(f"dims has {len(dims)} entries but stem_modules selected {len(found.targets)} modules")
    return config.replace(**changes)


def _first_tensor(value: Any) -> torch.Tensor:
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def connect(model: nn.Module, config: ResTuningConfig, adapter_name: str, targets: list[str]) -> Callable[[], None]:
    """Register the detached taps feeding this adapter's bypass; returns their removal."""
    wrapper = model.get_submodule(targets[0])
    bypass: ResTuningBypass = wrapper.deltas[adapter_name]
    bypass.stem_names = list(config.stem_modules)
    hooks = HookSet()
    bypass.taps = hooks.context

    def record(key: Any, value: Any) -> None:
        if adapter_name in wrapper.active and not wrapper.disabled:
            hooks.context[key] = _first_tensor(value).detach()

    def tap(module: nn.Module, key: Any, where: str) -> None:
        if where == "input":
            hooks.pre_forward(
                module, lambda m, args, kwargs: record(key, args or next(iter(kwargs.values()))), with_kwargs=True
            )
        else:
            hooks.forward(module, lambda m, args, output: record(key, output))

    names = [name for name, _ in user_view(model)]
    if config.root_modules is not None:
        root = next(n for n in names if matching.is_target(n, config, config.root_modules))
        tap(model.get_submodule(root), "root", config.root_modules_hook)
    else:
        tap(model.get_submodule(config.stem_modules[0]), "root", "input")
    for index, name in enumerate(config.stem_modules):
        tap(model.get_submodule(name), index, config.stem_modules_hook)
    return hooks.remove


SPEC = TunerSpec(
    name="restuning",
    kind="side",
    config=ResTuningConfig,
    peft_type="RESTUNING",
    dispatch=("any",),
    build=build,
    prepare=prepare,
    connect=connect,
    mergeable=False,
    identity_at_init=False,
    paper="https://arxiv.org/abs/2310.19859",
    example_configs=(
        # the blocks of the transformers models feed the bypass, which replaces the final norm's input
        {
            "stem_modules": r".*\.(layers|h|layer)\.\d+",
            "target_modules": r"(model\.norm|transformer\.ln_f|vit\.layernorm)",
            "tuner_cfg": {"res_adapter": {"adapter_length": 4}},
        },
    ),
)
