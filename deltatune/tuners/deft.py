"""DEFT: W' = (I - P_proj) W + Q_P (s R), a residual projection that removes a rank-r part of W and injects a new one.

"DEFT: Decompositional Efficient Fine-Tuning for Text-to-Image Models", NeurIPS 2025,
https://proceedings.neurips.cc/paper_files/paper/2025/hash/93a34a7138bdad95e874018d5f491cc6-Abstract-Conference.html.
A learned direction P (out, r) defines Q_P and a
projector P_proj = Q_P right(P)^T:

    "relu" (default): Q_P = P, right = relu(P)         (a non-orthogonal projection)
    "qr":             Q_P = qr(P), right = Q_P         (orthogonal)
    y = base(x) - ((W x) right) Q_P^T + (s R drop(x)) Q_P^T,      s = alpha / r (1 without alpha)

i.e. dW = Q_P (s R - right^T W). At creation R = right^T W / s, so a fresh adapter is exactly the identity
(it reads the base weight once; a loaded adapter brings its R). With `para` (PaRa) there is no R: the
update only removes, dW = -Q_P right^T W, which is not the identity at init. dW depends on W, so merging
keeps W for an exact unmerge. P starts N(0, 0.02^2); r is capped at out. Layer kinds: Linear and GPT-2 Conv1D.

File layout is peft's: "<module>.deft_P" (out, r) and "<module>.deft_R" (r, in) (no R with para).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall
from deltatune.tuners.weight_delta import CONTRACT_MODELS, check_positive_int, check_probability


@dataclass(kw_only=True)
class DeftConfig(TunerConfig):
    """Configuration of a DEFT adapter (field names and meanings are peft's)."""

    tuner_name = "deft"
    peft_type = "DEFT"
    unsupported_peft_keys = {"bias": "none"}

    r: int = 8
    """Rank of the projection and injection (capped at out_features)."""
    decomposition_method: str = "relu"
    """"relu" (non-orthogonal projection) or "qr" (orthogonal)."""
    init_scale: float = 1.0
    """Std multiplier of R's random init with init_weights=False."""
    alpha: int | None = None
    """Scale of the injection alpha / r (None: 1)."""
    para: bool = False
    """PaRa: only the projection, no injection R."""
    fan_in_fan_out: bool = False
    """Kept for peft's files; GPT-2 Conv1D layers are read in the canonical (out, in) layout."""
    deft_dropout: float = 0.0
    """Dropout on the injection's input only."""
    init_weights: bool = True
    """True: R = right^T W / s (identity at init). False: R random (tests only)."""

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_probability("deft_dropout", self.deft_dropout)
        if self.decomposition_method not in ("relu", "qr"):
            raise ConfigError(f"decomposition_method must be 'relu' or 'qr', got {self.decomposition_method!r}")


class DeftDelta(nn.Module):
    def __init__(self, info: LayerInfo, *, r: int, method: str, scale: float, para: bool, init: bool,
                 init_scale: float, dropout: float):  # fmt: skip
        super().__init__()
        self.method, self.scale, self.init = method, scale, init
        self.deft_P = nn.Parameter(torch.randn(info.out_features, r) * 0.02)
        if not para:
            self.deft_R = nn.Parameter(torch.randn(r, info.in_features) * 0.02 * init_scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _project(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_P, right), each (out, r), fp32."""
        p = self.deft_P.float()
        if self.method == "qr":
            q = torch.linalg.qr(p)[0]
            return q, q
        return p, torch.relu(p)

    def init_from_base(self, read_weight, write_weight) -> None:
        """R = right^T W / s: the injection puts back exactly what the projection removes."""
        if self.init and hasattr(self, "deft_R"):
            with torch.no_grad():
                self.deft_R.copy_(self._project()[1].T @ read_weight().float() / self.scale)

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)
        q, right = self._project()
        out = result.float()
        product = out if base.bias is None else out - base.bias.float()  # W x
        out = out - (product @ right) @ q.T  # (..., out)
        if hasattr(self, "deft_R"):
            out = out + F.linear(self.dropout(x.float()), self.deft_R.float() * self.scale) @ q.T
        return out.to(result.dtype)

    def _delta(self, weight: torch.Tensor) -> torch.Tensor:
        q, right = self._project()
        removed = right.T @ weight  # (r, in)
        if hasattr(self, "deft_R"):
            return q @ (self.deft_R.float() * self.scale - removed)
        return -(q @ removed)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight + self._delta(weight).to(weight), bias, weight.clone()

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, original: torch.Tensor):
        return original.to(weight), bias


def build(config: DeftConfig, info: LayerInfo, module_name: str) -> nn.Module:
    """The one place DeftConfig is read."""
    if info.kind != "linear":
        raise ConfigError(f"DEFT adapts linear layers only; {module_name!r} is a {info.kind} layer")
    r = min(config.r, info.out_features)
    return DeftDelta(
        info, r=r, method=config.decomposition_method, scale=(config.alpha / r) if config.alpha else 1.0,
        para=config.para, init=config.init_weights, init_scale=config.init_scale, dropout=config.deft_dropout,
    )  # fmt: skip


SPEC = TunerSpec(
    name="deft",
    kind="delta",
    config=DeftConfig,
    peft_type="DEFT",
    dispatch=("linear",),
    build=build,
    paper="https://proceedings.neurips.cc/paper_files/paper/2025/hash/93a34a7138bdad95e874018d5f491cc6-Abstract-Conference.html",
    contract_models=CONTRACT_MODELS,
    example_configs=({"r": 2, "alpha": 4, "decomposition_method": "qr"},),
)
