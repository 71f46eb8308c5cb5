"""HookSet: owns every hook handle a tuner registers, so undoing a tuner removes them all.

Side tuners tap activations through forward hooks; input tuners rewrite model inputs through
forward pre-hooks with kwargs. Nothing ever assigns to `module.forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class HookSet:
    """A named group of hook handles that is removed as one."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self.context: dict[str, Any] = {}
        """Per-forward scratch space (e.g. tapped activations), cleared by `clear_context`."""

    def forward(self, module: nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False) -> RemovableHandle:
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def pre_forward(self, module: nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False) -> RemovableHandle:
        handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def clear_context(self) -> None:
        self.context.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.context.clear()

    def __len__(self) -> int:
        return len(self._handles)
