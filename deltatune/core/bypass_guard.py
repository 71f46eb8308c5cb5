"""Refuse a call that runs the transformer stack around an active input adapter.

Prompt, P- and prefix tuning live outside the model: `TunedModel.forward` (and `generate`,
`model_inputs`) rewrite the inputs before the stack sees them. Code that reaches past the wrapper
and calls the stack itself with raw token ids trains and evaluates the base model while the user
believes the adapter is on. TRL's trainers do that: `add_fused_lm_head` replaces the forward of any
model that is not a `peft.PeftModel` with one that calls `model.base_model(...)` directly. The
guard is a forward pre-hook on the stack: raw `input_ids`, no `inputs_embeds` and no filled KV
cache while an input adapter is active is what an un-rewritten call looks like (every rewritten
one carries virtual-token embeddings or a prefix cache), and it raises instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from deltatune.core.config import ConfigError


def install(tuned: Any) -> Callable[[], None] | None:
    """Guard `tuned`'s transformer stack (the model's `base_model`); returns the remover, or None
    when the model has no separate stack (then the adapter is applied by the only entry point)."""
    stack = getattr(tuned.model, "base_model", None)
    if not isinstance(stack, nn.Module) or stack is tuned.model:
        return None
    handle = stack.register_forward_pre_hook(_RawIdsGuard(tuned), with_kwargs=True)
    return handle.remove


class _RawIdsGuard:
    """The pre-hook. A plain object holding its TunedModel (not a closure), so that a deep copy of
    the model gets a guard of the copy, and the model still pickles."""

    def __init__(self, tuned: Any):
        self.tuned = tuned

    def __call__(self, stack: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.tuned._active_input() is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or kwargs.get("inputs_embeds") is not None:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return
        raise ConfigError(
            f"{type(stack).__name__} was called with raw input_ids while an input adapter (prompt / P- / prefix "
            "tuning) is active, so its virtual tokens would be skipped and the base model trained or evaluated "
            "instead. Call the TunedModel itself, or rewrite the inputs with tuned.model_inputs(...) first. "
            "(TRL's trainers replace the forward of models that are not peft.PeftModel this way: train prompt, "
            "P- and prefix tuning with transformers.Trainer or `deltatune sft`.)"
        )
