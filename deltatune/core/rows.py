"""Mixed-adapter batches: `adapter_names=[...]` gives each row of a batch its own adapter (peft's meaning).

One name per row, `"__base__"` for the base model. Delta and "select" tuners get this for free: every
wrapper runs its base layer once over the whole batch and each adapter's delta over that adapter's
rows (core/wrapper.py). Virtual-token ("input") tuners mix rows when all rows use virtual tokens of the
same kind and count: each row gets its own table (`table_rows` in the tuner reads a `RowTable`). What
cannot mix rows raises a ConfigError naming the adapter, never a silently different answer:
side tuners (their taps see the whole batch), structural tuners (added layers hold their own cache),
and virtual-token rows next to rows without (their sequences differ in length). A layer whose input
carries no batch rows (position tables, relative-position biases) refuses too, when an adapter changes
it. Activations folded batch-major (Swin's windows, (B, T, d) flattened to (B * T, d)) are understood;
a model laying activations out sequence-first would need its own handling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from deltatune.core import inject
from deltatune.core.config import ConfigError
from deltatune.core.wrapper import BASE_ROW, RowAdapters

MIXABLE_KINDS = ("delta", "select", "input")


class RowTable:
    """Stands in for an input adapter's module when rows use different virtual-token adapters.

    `rows_table(batch)` gives (batch, rows, width), each row its adapter's table; plain attributes
    (num_virtual_tokens, layouts) come from the first adapter's module (all were checked to agree).
    A tuner reading the single `table()` cannot mix rows: that raises."""

    def __init__(self, modules: dict[str, nn.Module], names: list[str], tuner: str, expand: int = 1):
        self._modules_by_name, self._tuner = modules, tuner
        self._rows = RowAdapters(names, expand)
        self._first = next(iter(modules.values()))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._first, name)

    def table(self) -> torch.Tensor:
        raise ConfigError(
            f"adapter_names: {self._tuner} cannot give each row its own virtual tokens; run each adapter's rows "
            "in a batch of their own (set_adapter)"
        )

    def rows_table(self, batch: int) -> torch.Tensor:
        names = list(self._modules_by_name)
        tables = [self._modules_by_name[n].table() for n in names]
        if len({tuple(t.shape) for t in tables}) > 1:
            shapes = {n: tuple(t.shape) for n, t in zip(names, tables)}
            raise ConfigError(f"adapter_names: these virtual-token adapters have different table shapes {shapes}")
        stacked = torch.stack(tables)  # (adapters, rows, width)
        out = stacked.new_empty((batch, *stacked.shape[1:]))
        for name, idx in self._rows.groups(batch, stacked.device):
            out[idx] = stacked[names.index(name)]
        return out  # (batch, rows, width)


def check_names(adapters: dict[str, Any], names: Sequence[str]) -> list[str]:
    """The names as a list; unknown names, or a tuner that cannot mix rows, raise ConfigError."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ConfigError(f"adapter_names must be a non-empty list with one adapter name per row, got {names!r}")
    names = list(names)
    for name in dict.fromkeys(names):
        if name == BASE_ROW:
            continue
        if not isinstance(name, str) or name not in adapters:
            raise ConfigError(
                f"adapter_names: no adapter named {name!r}; loaded adapters: {sorted(adapters)} "
                f"(use {BASE_ROW!r} for rows that get the base model)"
            )
        spec = adapters[name].spec
        if spec.kind not in MIXABLE_KINDS:
            raise ConfigError(
                f"adapter_names: adapter {name!r} is a {spec.name} adapter ({spec.kind} tuner), which cannot run "
                "different adapters in the rows of one batch; run its rows in a batch of their own (set_adapter)"
            )
    return names


def generate_expansion(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many times generate repeats each row (num_beams for beam search, else num_return_sequences)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returns = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    return int(beams if beams > 1 else returns)


def input_plan(
    adapters: dict[str, Any], input_modules: nn.ModuleDict, names: list[str], expand: int = 1
) -> tuple[Any, Any] | None:
    """(spec, RowTable) when the rows use virtual-token adapters, None when none does; else ConfigError."""
    virtual = [n for n in dict.fromkeys(names) if n in input_modules]
    if not virtual:
        return None
    others = [n for n in dict.fromkeys(names) if n not in input_modules]
    if others:
        raise ConfigError(
            f"adapter_names: rows with virtual-token adapters {virtual} cannot share a batch with rows using "
            f"{others} (their sequences would differ in length); batch them separately"
        )
    specs = {adapters[n].spec.prepare_inputs for n in virtual}
    counts = {input_modules[n].num_virtual_tokens for n in virtual}
    if len(specs) > 1 or len(counts) > 1:
        kinds = {n: f"{adapters[n].spec.name}, {input_modules[n].num_virtual_tokens} tokens" for n in virtual}
        raise ConfigError(
            f"adapter_names: rows in one batch need virtual tokens of one kind and count, got {kinds}; batch them "
            "separately"
        )
    spec = adapters[virtual[0]].spec
    return spec, RowTable({n: input_modules[n] for n in virtual}, names, spec.name, expand)


@contextlib.contextmanager
def mixed_rows(
    model: nn.Module, adapters: dict[str, Any], input_modules: nn.ModuleDict, names: Sequence[str], expand: int = 1
) -> Iterator[Any]:
    """Inside the block every wrapper in `model` runs each row with its own adapter (`expand`: see RowAdapters).

    Yields the input plan (see `input_plan`) for the caller to use instead of its active input adapter."""
    names = check_names(adapters, names)
    plan = input_plan(adapters, input_modules, names, expand)
    deltas = [w for _, w in inject.delta_wrappers(model)]
    merged = sorted({n for w in deltas for n in w.merged})
    if merged:
        raise ConfigError(
            f"adapter_names cannot be used while adapters {merged} are merged; call unmerge_adapter() first"
        )
    wrappers = deltas + [s for _, s in inject.save_wrappers(model)]
    rows = RowAdapters(names, expand)
    for wrapper in wrappers:
        wrapper.rows = rows
    try:
        yield plan
    finally:
        for wrapper in wrappers:
            wrapper.rows = None
