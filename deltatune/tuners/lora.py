"""LoRA: y = base(x) + s * B A dropout(x), with A in R^{r x in}, B in R^{out x r}, s = alpha / r.

Hu et al. 2021, https://arxiv.org/abs/2106.09685. B starts at zero, so a freshly injected model
computes exactly what the base model computes; only A and B train, r * (in + out) values per layer.

Variants, all in this file:
- rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732): s = alpha / sqrt(r), which keeps
  the update's scale stable as r grows.
- DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353): W' = m * (W + s B A) / ||W + s B A||_row.
  The direction gets the low-rank update, the per-output magnitude m (init ||W||_row) trains on
  its own. The norm is treated as a constant in backward (paper, section 4.3). Unmerged:
      y = base(x) + (m/n - 1) * (W x) + (m/n) * s * B A x,      n = ||W + s B A||_row (detached)
- Initialisations (`init_lora_weights`): True (A Kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r),
  B = 0), False (both random: the adapter changes the output at once; for tests), "pissa"
  (Meng et al. 2024, https://arxiv.org/abs/2404.02948: A, B from the top-r singular triplets of W,
  and W := W - s B A), "olora" (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775: A, B from a QR
  decomposition of W, and W := W - s B A). PiSSA/OLoRA rewrite the base weight, so such an
  adapter belongs with that residual base (or merge it: merge_and_unload gives the full model).
- Layer kinds: Linear and GPT-2 Conv1D (canonical (out, in) weight), Embedding (A: (r, vocab),
  B: (dim, r), peft's layout), Conv1d/2d/3d (A: a conv with the base's kernel, B: a 1x1 conv).

Weights are kept in fp32 (the master copy) whatever the base dtype; each forward casts the small
A and B to the activation dtype instead of casting activations up.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.backends import LayerInfo
from deltatune.core.config import ConfigError, TunerConfig
from deltatune.core.registry import TunerSpec
from deltatune.core.wrapper import BaseCall, MergeError
from deltatune.ops.lora_linear import cast, lora_linear


@dataclass(kw_only=True)
class LoraConfig(TunerConfig):
    """Configuration of a LoRA / DoRA / rsLoRA adapter (field names and meanings are peft's)."""

    tuner_name = "lora"
    peft_type = "LORA"
    unsupported_peft_keys = {
        "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None, "eva_config": None,
        "kasa_config": None, "layer_replication": None, "loftq_config": {}, "lora_bias": False,
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "monteclora_config": None, "qalora_group_size": 16, "target_parameters": None,
        "use_bdlora": None, "use_qalora": False, "velora_config": None,
        "ensure_weight_tying": False,
    }  # fmt: skip
    run_defaults = {"lora_alpha": 16}  # the demo's scale of 2 at r=8

    r: int = 8
    """Rank of the update; trainable values per target = r * (in + out)."""
    lora_alpha: float = 8
    """Numerator of the update scale (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the input of A only; the frozen path is never dropped. 0 skips the copy."""
    fan_in_fan_out: bool = False
    """Set automatically for GPT-2 Conv1D targets (weights stored as (in, out)); kept for peft."""
    bias: str = "none"
    """Which base biases also train and are saved: "none", "all", or "lora_only" (targets' biases)."""
    use_rslora: bool = False
    """Scale by lora_alpha / sqrt(r) (rank-stabilized LoRA)."""
    use_dora: bool = False
    """Weight-decomposed LoRA: train a per-output magnitude as well as the low-rank direction."""
    init_lora_weights: bool | str = True
    """True, "gaussian", False, "pissa" (or "pissa_niter_K"), or "olora"."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex on the name's tail: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: {regex on the name's tail: alpha}."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Embedding rows that train in full besides the LoRA (e.g. new tokens): a list for the input
    embedding, or {embedding module name: ids}; see tuners/trainable_tokens.py."""

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "pissa", "olora") or _pissa_niter(init)):
            raise ConfigError(
                f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' or 'olora', got {init!r}"
            )
        tokens = self.trainable_token_indices
        if tokens is not None:
            from deltatune.tuners.trainable_tokens import check_indices

            for key, ids in (tokens.items() if isinstance(tokens, dict) else [("", tokens)]):
                check_indices(ids, f"trainable_token_indices{f'[{key!r}]' if key else ''}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise ConfigError(f"{name} must be a dict {{regex: value}}, got {pattern!r}")
            for key, value in pattern.items():
                if not isinstance(value, (int, float)) or value <= 0 or (name == "rank_pattern" and value != int(value)):
                    raise ConfigError(f"{name}[{key!r}] must be a positive {'integer' if name == 'rank_pattern' else 'number'}")


    def warn_on_load(self, source: str) -> None:
        if self.init_lora_weights in ("pissa", "olora") or _pissa_niter(self.init_lora_weights):
            warnings.warn(
                f"{source}: this adapter was initialised with {self.init_lora_weights!r}, which rewrites the base "
                "weights; it reproduces the trained model only on that residual base (or merge it before export)",
                stacklevel=3,
            )


def _pissa_niter(init: Any) -> int | None:
    found = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
    return int(found.group(1)) if found else None


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """peft's get_pattern_key: the first pattern matching the end of the dotted name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


# ---------------------------------------------------------------------------------------------
# Math modules: tensors and plain numbers only.
# ---------------------------------------------------------------------------------------------
class _LoraBase(nn.Module):
    """Shared merge/DoRA logic; subclasses give the update's dense form and its forward."""

    def __init__(self, *, r: int, scale: float, dropout: float, use_dora: bool, init: bool | str):
        super().__init__()
        self.r, self.scale, self.use_dora, self.init = r, scale, use_dora, init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """s * B A in the base's canonical layout, fp32."""
        raise NotImplementedError

    # DoRA: norm of each output row/channel of (W + s B A); the magnitude divides by it.
    def _norm_dims(self, weight: torch.Tensor) -> tuple[int, ...]:
        return tuple(range(1, weight.dim()))

    def _dora_norm(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight + delta, dim=self._norm_dims(weight))  # (out,)

    def _magnitude_view(self, weight: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (weight.dim() - 1)

    def merge(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W + s B A, bias, None); DoRA: (m / n * (W + s B A), bias, n) with n kept to unmerge."""
        delta = self.delta_weight().to(weight)
        if not self.use_dora:
            return weight + delta, bias, None
        norm = self._dora_norm(weight, delta)  # (out,)
        scale = (self.lora_magnitude_vector.float().flatten() / norm).view(self._magnitude_view(weight))
        return scale * (weight + delta), bias, norm

    def unmerge(self, weight: torch.Tensor, bias: torch.Tensor | None, norm: torch.Tensor | None):
        delta = self.delta_weight().to(weight)
        if not self.use_dora:
            return weight - delta, bias
        scale = (self.lora_magnitude_vector.float().flatten() / norm).view(self._magnitude_view(weight))
        return weight / scale - delta, bias

    def init_from_base(self, read_weight, write_weight) -> None:
        """PiSSA/OLoRA (rewrite the base) and DoRA's magnitude need the base weight."""
        if self.init in ("pissa", "olora") or _pissa_niter(self.init):
            self._init_from_decomposition(read_weight, write_weight)
        if self.use_dora:
            weight = read_weight().float()
            with torch.no_grad():
                norm = self._dora_norm(weight, self.delta_weight().to(weight))
                self.lora_magnitude_vector.copy_(norm.reshape(self.lora_magnitude_vector.shape))

    def _init_from_decomposition(self, read_weight, write_weight) -> None:
        raise ConfigError(f"init_lora_weights={self.init!r} is only supported on linear layers")


def _one_node(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Use `lora_linear` (one autograd node): gradients are recorded, the base is frozen, no autocast."""
    return (
        torch.is_grad_enabled()
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and not torch.is_autocast_enabled(x.device.type)
    )


class LoraLinear(_LoraBase):
    """Low-rank update of a linear map with canonical weight (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, **kw: Any):
        super().__init__(**kw)
        r = kw["r"]
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features))
        if self.init is True or self.init in ("pissa", "olora") or _pissa_niter(self.init):
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
            nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale  # (out, in)

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        master_a, master_b = self.lora_A.weight, self.lora_B.weight  # fp32 masters, cast per use below
        dropout = self.dropout
        plain_dropout = isinstance(dropout, nn.Identity)
        dropped = x if plain_dropout else dropout(x)
        fusable = not self.use_dora or plain_dropout  # DoRA regroups base + update only without dropout
        summed = None  # base(x) + s B A x, as (N, out), when one addmm can give it
        a = b = None  # A and B in x's dtype, cast once by whichever path below needs them
        plain = base.plain_linear() if fusable else None
        if plain is not None and x.dtype == plain[0].dtype:
            # A plain nn.Linear: y = x W^T + b, then y += s (x A^T) B^T in place (one addmm: the
            # add rides on the GEMM; no (..., out) update tensor, no copy). Safe under autograd too:
            # y is fresh and linear's backward never reads its output.
            weight, bias = plain
            flat, extra = x.reshape(-1, x.shape[-1]), None if plain_dropout else dropped.reshape(-1, x.shape[-1])
            if _one_node(x, weight, bias):  # training: one autograd node (it casts A and B itself)
                summed = lora_linear(flat, extra, weight, bias, master_a, master_b, self.scale)
            else:
                a = cast(master_a, x.dtype)  # (r, in): cast the small weights, not the activations
                summed = F.linear(flat, weight, bias)  # (N, out); autocast may have made it bf16/fp16
                xa = F.linear(flat if extra is None else extra, a)  # (N, r)
                summed.addmm_(cast(xa, summed.dtype), cast(master_b, summed.dtype).t(), alpha=self.scale)
        else:
            a, b = cast(master_a, x.dtype), cast(master_b, x.dtype)  # (r, in), (out, r)
            result = base(x)
            if fusable and result.dtype == x.dtype:  # any other layer: one out-of-place addmm
                xa = F.linear(dropped, a).reshape(-1, a.shape[0])  # (N, r)
                summed = torch.addmm(result.reshape(-1, result.shape[-1]), xa, b.t(), alpha=self.scale)
        # no single addmm (another output dtype, or DoRA with dropout): the update as its own tensor;
        # A and B were cast above, since only the plain-linear branch sets `summed`
        update = None if summed is not None else F.linear(F.linear(dropped, a), b * self.scale)  # (..., out)
        if not self.use_dora:
            return result + update if summed is None else summed.view(*x.shape[:-1], summed.shape[-1])
        if a is None or b is None:
            a, b = cast(master_a, x.dtype), cast(master_b, x.dtype)
        weight = base.weight().to(x.dtype)  # (out, in)
        with torch.no_grad():
            norm = self._dora_norm(weight, (b * self.scale) @ a)  # (out,), a constant in backward (DoRA section 4.3)
        ratio = self.lora_magnitude_vector.to(x.dtype) / norm  # (out,)
        if summed is not None:
            # result + (ratio - 1) (W x) + ratio * update, with W x = result - bias, regrouped:
            out = (summed * ratio).view(*x.shape[:-1], summed.shape[-1])
            return out if base.bias is None else out + (1 - ratio) * base.bias.to(out.dtype)
        if plain_dropout:
            out = (result + update) * ratio
            return out if base.bias is None else out + (1 - ratio) * base.bias.to(out.dtype)
        return result + (ratio - 1) * F.linear(dropped, weight) + ratio * update

    def _init_from_decomposition(self, read_weight, write_weight) -> None:
        weight = read_weight().float()  # (out, in)
        r = self.r
        with torch.no_grad():
            if self.init == "olora":
                q, rr = torch.linalg.qr(weight)
                a, b = rr[:r].contiguous(), q[:, :r].contiguous()
            else:
                niter = _pissa_niter(self.init)
                if niter is None:
                    v, s, uh = torch.linalg.svd(weight, full_matrices=False)
                    vr, sr, uhr = v[:, :r], s[:r] / self.scale, uh[:r]
                else:
                    vr, sr, ur = torch.svd_lowrank(weight, q=r, niter=niter)
                    sr, uhr = sr / self.scale, ur.T
                a = torch.diag(torch.sqrt(sr)) @ uhr  # (r, in)
                b = vr @ torch.diag(torch.sqrt(sr))  # (out, r)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
            write_weight(weight - self.scale * (b @ a))


class LoraEmbedding(_LoraBase):
    """Low-rank update of an embedding table (num_embeddings, dim); peft's parameter layout."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int | None, **kw: Any):
        super().__init__(**kw)
        r = kw["r"]
        self.padding_idx = padding_idx
        self.lora_embedding_A = nn.Parameter(torch.randn(r, num_embeddings))  # (r, vocab)
        self.lora_embedding_B = nn.Parameter(torch.randn(embedding_dim, r))  # (dim, r)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(embedding_dim))
        if self.init is not False:
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scale  # (vocab, dim)

    # DoRA on embeddings normalises each embedding dimension over the vocabulary (peft's choice).
    def _norm_dims(self, weight: torch.Tensor) -> tuple[int, ...]:
        return (0,)

    def _magnitude_view(self, weight: torch.Tensor) -> tuple[int, ...]:
        return (1, -1)

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)
        a = self.lora_embedding_A.T.to(result.dtype)  # (vocab, r)
        b = self.lora_embedding_B.T.to(result.dtype)  # (r, dim)
        update = F.embedding(x, a, padding_idx=self.padding_idx) @ b * self.scale  # (..., dim)
        embed_scale = base.output_scale  # a scaled embedding (Gemma: sqrt(dim)) scales its rows' update too
        if embed_scale is not None:
            update = update * (embed_scale.to(update.dtype) if torch.is_tensor(embed_scale) else embed_scale)
        if not self.use_dora:
            return result + update
        weight = base.weight().to(result.dtype)
        with torch.no_grad():
            norm = self._dora_norm(weight, (a @ b) * self.scale)  # (dim,)
        ratio = self.lora_magnitude_vector.to(result.dtype) / norm
        return ratio * (result + update)


class LoraConv(_LoraBase):
    """Low-rank update of a ConvNd: A has the base's kernel (in -> r), B is 1x1 (r -> out)."""

    def __init__(self, info: LayerInfo, **kw: Any):
        super().__init__(**kw)
        r = kw["r"]
        self.groups = info.groups
        # groups > 1, peft's layout: A sees every input channel, B is grouped (rank chunk g -> output group g)
        if info.groups > 1:
            if r % info.groups:
                raise ConfigError(
                    f"LoRA on a convolution with groups={info.groups} needs r divisible by groups (got r={r}); "
                    "choose such an r (rank_pattern can set it per layer) or exclude the layer"
                )
            if self.use_dora:
                raise ConfigError("DoRA on grouped convolutions (groups > 1) is not supported; set use_dora=False")
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[info.conv_ndim]
        self.lora_A = conv(info.in_features, r, info.kernel_size, info.stride, info.padding, info.dilation, bias=False)
        self.lora_B = conv(r, info.out_features, 1, 1, groups=info.groups, bias=False)
        self.conv_ndim = info.conv_ndim
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones((1, info.out_features) + (1,) * info.conv_ndim))
        if self.init is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        elif self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
            nn.init.zeros_(self.lora_B.weight)

    def check_mergeable(self) -> None:
        """Raise MergeError when the update has no form in the base weight (TunedModel asks before any write)."""
        if self.groups > 1:
            raise MergeError(
                "LoRA on a grouped convolution (groups > 1) cannot be merged: its update mixes every input channel, "
                "which the grouped weight cannot hold (peft refuses too). Keep it unmerged"
            )

    def delta_weight(self) -> torch.Tensor:
        self.check_mergeable()
        a, b = self.lora_A.weight.float(), self.lora_B.weight.float()
        out_shape = (b.shape[0],) + tuple(a.shape[1:])
        return (b.flatten(1) @ a.flatten(1)).view(out_shape) * self.scale  # (out, in, *k)

    def _magnitude_view(self, weight: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (weight.dim() - 1)

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        result = base(x)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.conv_ndim - 1]
        a_mod = self.lora_A
        a = a_mod.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        dropped = self.dropout(x)
        update = conv(conv(dropped, a, None, a_mod.stride, a_mod.padding, a_mod.dilation), b, groups=self.groups)
        update = update * self.scale
        if not self.use_dora:
            return result + update
        weight = base.weight().to(x.dtype)
        with torch.no_grad():
            norm = self._dora_norm(weight, self.delta_weight().to(weight))  # (out,)
        shape = (1, -1) + (1,) * self.conv_ndim
        ratio = (self.lora_magnitude_vector.flatten().to(x.dtype) / norm).view(shape)
        if isinstance(self.dropout, nn.Identity):
            base_out = result if base.bias is None else result - base.bias.to(result.dtype).view(shape)
        else:
            base_out = conv(dropped, weight, None, a_mod.stride, a_mod.padding, a_mod.dilation)
        return result + (ratio - 1) * base_out + ratio * update


class LoraMultiheadAttention(_LoraBase):
    """LoRA on torch.nn.MultiheadAttention (CLIP/OpenCLIP-style towers), peft's layout and meaning.

    Both projections get a low-rank update: in_proj (3E, E) += s B A, out_proj (E, E) += s B' A'.
    The layer reads those weights directly, so the unmerged forward runs it with the updated weights
    (y = MHA_{W + s B A}(x)); the canonical weight is [in_proj; out_proj] (backends/mha.py). Keys are
    peft's: "<mha>.lora_A.weight", "<mha>.lora_B.weight", "<mha>.base_layer.out_proj.lora_A.weight", ...
    Dropout does not apply (there is no separate input to drop), as in peft; DoRA is refused.
    """

    def __init__(self, embed_dim: int, **kw: Any):
        super().__init__(**kw)
        if self.use_dora:
            raise ConfigError("DoRA on nn.MultiheadAttention is not supported (nor in peft); set use_dora=False")
        r = kw["r"]
        self.lora_A = nn.Linear(embed_dim, r, bias=False)
        self.lora_B = nn.Linear(r, 3 * embed_dim, bias=False)
        out_proj = nn.Module()  # file keys "<mha>.base_layer.out_proj.lora_A.weight", as peft nests them
        out_proj.lora_A = nn.Linear(embed_dim, r, bias=False)
        out_proj.lora_B = nn.Linear(r, embed_dim, bias=False)
        self.base_layer = nn.Module()
        self.base_layer.out_proj = out_proj
        for a, b in ((self.lora_A, self.lora_B), (out_proj.lora_A, out_proj.lora_B)):
            if self.init is True:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                nn.init.zeros_(b.weight)
            elif self.init == "gaussian":
                nn.init.normal_(a.weight, std=1 / r)
                nn.init.zeros_(b.weight)

    def delta_weight(self) -> torch.Tensor:
        out = self.base_layer.out_proj
        d_in = self.lora_B.weight.float() @ self.lora_A.weight.float()  # (3E, E)
        d_out = out.lora_B.weight.float() @ out.lora_A.weight.float()  # (E, E)
        return torch.cat([d_in, d_out]) * self.scale  # (4E, E), backends/mha.py's layout

    def forward(self, x: torch.Tensor, base: BaseCall) -> torch.Tensor:
        out = self.base_layer.out_proj
        w = base.weight()  # (4E, E): [in_proj; out_proj], frozen
        embed = w.shape[1]
        d_in = (self.lora_B.weight @ self.lora_A.weight) * self.scale  # (3E, E)
        d_out = (out.lora_B.weight @ out.lora_A.weight) * self.scale  # (E, E)
        replaced = {
            "in_proj_weight": w[: 3 * embed] + d_in.to(w.dtype),
            "out_proj.weight": w[3 * embed :] + d_out.to(w.dtype),
        }
        return base.call_with(x, replaced)


# ---------------------------------------------------------------------------------------------
# The one place LoraConfig is read.
# ---------------------------------------------------------------------------------------------
def check_rank(r: int, info: LayerInfo, module_name: str) -> None:
    """Refuse, before allocating, a rank beyond the layer's widths or an update that cannot fit in memory.

    Ranks up to in + out are accepted (peft saves and loads ranks above min(in, out), which add no
    capacity but are legal); anything larger is a mistake, such as r=10**9."""
    from deltatune.core.limits import check_allocation

    fan_in = info.in_features * math.prod(info.kernel_size or (1,)) // max(info.groups, 1)
    widths = (fan_in, info.out_features)
    if min(widths) > 0 and r > sum(widths):
        raise ConfigError(
            f"r={r} exceeds the dimensions of {module_name!r} (in {widths[0]}, out {widths[1]}); a rank above "
            f"min(in, out) = {min(widths)} adds no capacity: use r <= {min(widths)}"
        )
    check_allocation(r * sum(widths), what=f"LoRA r={r} on {module_name!r}", fix="lower r")


def build(config: LoraConfig, info: LayerInfo, module_name: str) -> nn.Module:
    r = int(_pattern_value(config.rank_pattern, module_name, config.r))
    alpha = float(_pattern_value(config.alpha_pattern, module_name, config.lora_alpha))
    scale = alpha / (math.sqrt(r) if config.use_rslora else r)
    check_rank(r, info, module_name)
    common = dict(r=r, scale=scale, dropout=config.lora_dropout, use_dora=config.use_dora, init=config.init_lora_weights)
    if info.kind == "linear":
        return LoraLinear(info.in_features, info.out_features, **common)
    if info.kind == "embedding":
        return LoraEmbedding(info.in_features, info.out_features, padding_idx=info.padding_idx, **common)
    if info.kind == "conv":
        return LoraConv(info, **common)
    if info.kind == "mha":
        return LoraMultiheadAttention(info.in_features, **common)
    raise ConfigError(f"LoRA cannot adapt {module_name!r} (layer kind {info.kind!r})")


def prepare(model: nn.Module, config: LoraConfig, targets: list[str]) -> LoraConfig:
    """Record fan_in_fan_out as peft does (GPT-2 Conv1D targets store weights as (in, out))."""
    from deltatune.backends import describe

    transposed = any(getattr(describe(model.get_submodule(t)), "fan_in_fan_out", False) for t in targets)
    return config.replace(fan_in_fan_out=True) if transposed and not config.fan_in_fan_out else config


def extra_trainable(model: nn.Module, config: LoraConfig, targets: list[str]) -> list[str]:
    """Base biases trained (and saved) under `bias`, by their parameter names in the wrapped model."""
    if config.bias == "none":
        return []
    names = [n for n, _ in model.named_parameters() if n.endswith("bias") and ".deltas." not in n]
    names = [n for n in names if ".modules_to_save." not in n and ".original_module." not in n]
    if config.bias == "all":
        return names
    prefixes = tuple(f"{t}.base_layer." for t in targets)
    return [n for n in names if n.startswith(prefixes)]


def connect(model: nn.Module, config: LoraConfig, adapter_name: str, targets: list[str]):
    """trainable_token_indices: the chosen embedding rows train next to the LoRA (tuners/trainable_tokens.py)."""
    if config.trainable_token_indices is not None:
        from deltatune.tuners.trainable_tokens import add_token_rows

        add_token_rows(model, config.trainable_token_indices, adapter_name, targets)
    return None


SPEC = TunerSpec(
    name="lora",
    kind="delta",
    config=LoraConfig,
    peft_type="LORA",
    dispatch=("linear", "embedding", "conv", "mha"),
    build=build,
    prepare=prepare,
    extra_trainable=extra_trainable,
    connect=connect,
    paper="https://arxiv.org/abs/2106.09685",
    example_configs=(
        {"r": 4, "lora_alpha": 8},
        {"r": 4, "lora_alpha": 8, "use_dora": True},
        {"r": 4, "lora_alpha": 16, "use_rslora": True, "init_lora_weights": "gaussian", "bias": "lora_only"},
    ),
)
