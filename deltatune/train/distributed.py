"""Training past one process: `--distributed ddp|fsdp|deepspeed-zero2|deepspeed-zero3`.

    accelerate launch --num_processes 4 -m deltatune.cli.main sft --distributed fsdp ...
    torchrun --nproc_per_node 4 -m deltatune.cli.main sft --distributed fsdp ...

ddp: accelerate's DistributedDataParallel (every rank holds the whole model and optimizer).

fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`), applied here rather than by accelerate's
auto-wrap, because the unit layout matters for adapters: every adapter (`deltas.<name>` of a
wrapped layer, or any other subtree whose parameters all train) is its own unit, then each
transformer block (its frozen weights only), then the root. So frozen weights never share a flat
group with trainable ones: they get no gradient and no optimizer state, and a bf16 base with fp32
adapters keeps a uniform dtype per unit (the mixed precision policy computes in the run's dtype and
reduces gradients in fp32). The same code runs on GPUs (NCCL) and on CPUs (gloo, the tests).

deepspeed-zero2 / deepspeed-zero3: a DeepSpeed config generated from the run's arguments
(`deepspeed_config`, `deepspeed_plugin`); the training loop refuses these modes for now (it does not
drive a DeepSpeed engine yet), with the fix (--distributed fsdp) in the message.

Saves from a sharded run gather full tensors on every rank (`full_view`), and every adapter save
refuses tensors that are empty or not the shape the adapter was built with (`check_saveable`): a
ZeRO-3 placeholder or a local shard can never be written as an adapter.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.core.config import ConfigError
from deltatune.train.errors import SaveError

MODES = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")
_ADAPTER_METHODS = ("overrides",)  # delta methods the wrapper calls instead of forward


# -- arguments ---------------------------------------------------------------------------------
def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ConfigError(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")


def mode_from_accelerate_config(path: str | Path) -> tuple[str, str | None]:
    """(distributed mode, mixed precision or None) of an `accelerate config` YAML/JSON file.

    Raises:
        ConfigError: unreadable file, or a setup deltatune does not run (FSDP1, other backends).
    """
    import json

    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"--accelerate-config {path}: cannot read it ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--accelerate-config {path}: expected a mapping (the file `accelerate config` writes)")
    kind = str(data.get("distributed_type", "NO")).upper()
    mixed = data.get("mixed_precision")
    mixed = None if mixed in (None, "no") else str(mixed)
    if kind == "FSDP":
        version = int((data.get("fsdp_config") or {}).get("fsdp_version", 1))
        if version != 2:
            raise ConfigError(
                f"--accelerate-config {path}: fsdp_version {version}; deltatune runs FSDP2 (set fsdp_version: 2)"
            )
        return "fsdp", mixed
    if kind == "DEEPSPEED":
        stage = int((data.get("deepspeed_config") or {}).get("zero_stage", 2))
        if stage not in (2, 3):
            raise ConfigError(f"--accelerate-config {path}: zero_stage {stage}; deltatune runs ZeRO stage 2 or 3")
        return f"deepspeed-zero{stage}", mixed
    if kind in ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU"):
        return "ddp", mixed
    raise ConfigError(
        f"--accelerate-config {path}: distributed_type {kind} is not supported; use ddp, FSDP (v2) or DEEPSPEED"
    )


# -- accelerate plugins ------------------------------------------------------------------------
def deepspeed_config(stage: int, *, batch_size: int, grad_accum: int, max_grad_norm: float, dtype: str) -> dict:
    """A DeepSpeed ZeRO config for one run (generated, never a hand-kept file per case).

    The optimizer and schedule stay deltatune's (AdamW, lr set every step), so the config names no
    optimizer or scheduler. ZeRO-3 gathers the full 16-bit weights on save so adapters are never
    written from partitions."""
    if stage not in (2, 3):
        raise ConfigError(f"DeepSpeed ZeRO stage must be 2 or 3, got {stage}")
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}  # fmt: skip
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": "auto",
                     "stage3_param_persistence_threshold": "auto"})  # fmt: skip
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm if max_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "zero_allow_untested_optimizer": True,
    }


def accelerator_kwargs(mode: str | None, args: Any) -> dict[str, Any]:
    """Extra `Accelerator(...)` arguments of a mode: nothing for ddp and fsdp (FSDP2 is applied by
    `shard_fsdp2`; see the module docstring). DeepSpeed modes are refused for now (ConfigError):
    the config is generated (`deepspeed_config`, `deepspeed_plugin`) but the loop does not yet run
    its steps through a DeepSpeed engine."""
    if mode is None or not mode.startswith("deepspeed"):
        return {}
    raise ConfigError(
        f"--distributed {mode}: the training loop does not drive a DeepSpeed engine yet (its own micro-batch "
        "accumulation and optimizer step would have to move into the engine); use --distributed fsdp, which "
        "shards adapters and frozen weights as ZeRO-3 does. The ZeRO config it will use: "
        "deltatune.train.distributed.deepspeed_config"
    )


def deepspeed_plugin(mode: str, args: Any):
    """accelerate's DeepSpeedPlugin with the generated config (needs DeepSpeed installed)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--distributed {mode} needs DeepSpeed: pip install deepspeed (on a machine with its accelerator "
            "toolkit), or use --distributed fsdp"
        ) from None
    from accelerate.utils import DeepSpeedPlugin

    config = deepspeed_config(int(mode[-1]), batch_size=args.batch_size, grad_accum=args.grad_accum,
                              max_grad_norm=args.max_grad_norm, dtype=args.dtype)  # fmt: skip
    return DeepSpeedPlugin(hf_ds_config=config)


def fsdp_plugin(args: Any):
    """accelerate's FSDP2 plugin with the same settings `shard_fsdp2` applies (for callers who let
    accelerate prepare the model; deltatune's own loop shards with `shard_fsdp2`)."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
        mixed_precision_policy=_mp_policy(args.dtype), cpu_ram_efficient_loading=False,
    )  # fmt: skip


# -- FSDP2 -------------------------------------------------------------------------------------
def _mp_policy(dtype: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)


def _all_trainable(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.requires_grad for p in params)


def adapter_units(model: nn.Module) -> list[str]:
    """Names of the maximal subtrees whose parameters all train (the adapters), outermost first."""
    units: list[str] = []
    for name, module in model.named_modules():
        if name and any(name.startswith(u + ".") for u in units):
            continue
        if name and _all_trainable(module) and not isinstance(module, (nn.ModuleDict, nn.ModuleList)):
            units.append(name)
    return units


def block_units(model: nn.Module) -> list[str]:
    """Names of the transformer blocks (the model's `_no_split_modules` classes), else of the
    children of the longest ModuleList."""
    classes: set[str] = set()
    for module in model.modules():
        classes |= set(getattr(module, "_no_split_modules", None) or [])
    names = [n for n, m in model.named_modules() if n and type(m).__name__ in classes]
    if names:
        return names
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    name, longest = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{i}" for i in range(len(longest))]


def shard_fsdp2(model: nn.Module, device: torch.device, world_size: int, dtype: str = "fp32") -> dict[str, int]:
    """Apply FSDP2 in place: adapters, then blocks (frozen weights only), then the root.

    Returns the count of units per kind. Trainable tensors of a unit with frozen ones would be a
    layout error, refused here (ConfigError) rather than silently training frozen weights' state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):  # sampled now: the frozen embeddings will be shards at save time
        from deltatune.io.provenance import base_fingerprint

        model.provenance = {**(getattr(model, "provenance", None) or {}), "base_fingerprint": base_fingerprint(inner)}
    mesh = init_device_mesh(device.type, (world_size,))
    policy = _mp_policy(dtype)
    adapters = adapter_units(model)
    blocks = block_units(model)
    modules = dict(model.named_modules())
    fp32 = MixedPrecisionPolicy()
    for name in adapters:  # adapters keep fp32 compute and reduction: they are small, and trained
        fully_shard(modules[name], mesh=mesh, reshard_after_forward=True, mp_policy=fp32)
        for method in _ADAPTER_METHODS:
            if callable(getattr(modules[name], method, None)):
                register_fsdp_forward_method(modules[name], method)
    for name in blocks:
        if any(p.requires_grad for n, p in modules[name].named_parameters() if not _under(f"{name}.{n}", adapters)):
            raise ConfigError(f"FSDP2: block {name} holds trainable tensors outside an adapter unit")
        fully_shard(modules[name], mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    # Every other module holding parameters directly (embeddings, final norm, output head) is a unit
    # of its own, so whichever path a task calls (the backbone alone, the head alone, generate)
    # gathers what it uses; a sharded head also turns the fused loss into the model's own forward.
    done = adapters + blocks
    leaves = [n for n, m in modules.items() if n and not _under(n, done) and n not in done
              and any(True for _ in m.parameters(recurse=False))]  # fmt: skip
    for name in leaves:
        if any(p.requires_grad for p in modules[name].parameters(recurse=False)):
            raise ConfigError(f"FSDP2: module {name} mixes trainable and frozen tensors; it cannot be sharded apart")
        fully_shard(modules[name], mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    if callable(getattr(model, "generate", None)):
        register_fsdp_forward_method(model, "generate")
    model._deltatune_sharded = True
    return {"adapter": len(adapters), "block": len(blocks), "other": len(leaves), "root": 1}


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def is_sharded(model: nn.Module) -> bool:
    return bool(getattr(model, "_deltatune_sharded", False))


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


class _FullOptimizer:
    """An optimizer stand-in whose state_dict holds full (gathered) tensors."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


@contextlib.contextmanager
def full_view(model: nn.Module, optimizer: Any = None, active: bool = True):
    """Within the block the model's trainable parameters are full plain tensors, on every rank.

    Call on every rank (gathering is collective). Yields an optimizer whose state_dict holds full
    tensors (or `optimizer` itself when nothing is sharded). On leaving, values written into the
    full parameters (a restored adapter) are scattered back into the shards. No forward may run
    inside the block."""
    if not active or not is_sharded(model):
        yield optimizer
        return
    from torch.distributed.tensor import distribute_tensor

    swapped = []
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and param.requires_grad and _is_dtensor(param):
                full = nn.Parameter(param.detach().full_tensor().clone(), requires_grad=True)
                module._parameters[key] = full
                swapped.append((module, key, param, full))
    full_optimizer = None
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)
        state = inner.state_dict()
        state = {"state": {i: {k: (v.full_tensor() if _is_dtensor(v) else v) for k, v in s.items()}
                           for i, s in state["state"].items()}, "param_groups": state["param_groups"]}  # fmt: skip
        full_optimizer = _FullOptimizer(state)
    try:
        yield full_optimizer
    finally:
        with torch.no_grad():
            for module, key, param, full in swapped:
                local = distribute_tensor(full.detach(), param.device_mesh, param.placements).to_local()
                param.to_local().copy_(local)
                module._parameters[key] = param


def reshard_optimizer_state(optimizer: Any) -> None:
    """After loading full optimizer state (a checkpoint of any world size), shard each tensor like
    its parameter."""
    from torch.distributed.tensor import distribute_tensor

    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        for param in group["params"]:
            if not _is_dtensor(param) or param not in inner.state:
                continue
            state = inner.state[param]
            for key, value in list(state.items()):
                if (
                    isinstance(value, torch.Tensor)
                    and not _is_dtensor(value)
                    and tuple(value.shape) == tuple(param.shape)
                ):
                    state[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Global gradient norm of sharded (DTensor) gradients, clipped to max_norm when > 0."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    local = [g.to_local() if _is_dtensor(g) else g for g in grads]
    sq = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in local]).sum()
    dist.all_reduce(sq)
    total = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(total):
        coef = min(1.0, max_norm / (total + 1e-6))
        for g in local:
            g.mul_(coef)
    return total


def grad_is_nonzero(param: nn.Parameter) -> bool:
    """Whether any element of the (possibly sharded) gradient is non-zero, the same on every rank."""
    if not _is_dtensor(param.grad):
        return bool(param.grad.abs().sum() > 0)
    import torch.distributed as dist

    flag = (param.grad.to_local().abs().sum() > 0).to(torch.float32).reshape(1)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


# -- saves that cannot be empty ---------------------------------------------------------------
def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """{key: full shape} of an adapter state dict (recorded when the adapter is built)."""
    return {k: tuple(v.shape) for k, v in state.items()}


def check_saveable(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]] | None, what: str) -> None:
    """Refuse to write an adapter whose tensors are empty, sharded, or not the built shapes.

    Raises:
        SaveError: names the first bad tensor (a ZeRO-3 placeholder, a local shard, a missing key).
    """
    for key, value in state.items():
        if _is_dtensor(value):
            raise SaveError(f"{what}: tensor {key!r} is a shard (DTensor); gather full tensors before saving")
        if value.numel() == 0:
            raise SaveError(
                f"{what}: tensor {key!r} is empty (shape {tuple(value.shape)}); a sharded run must gather full "
                "tensors before saving (ZeRO-3 partitions); nothing was written"
            )
        if expected is not None and key in expected and tuple(value.shape) != expected[key]:
            raise SaveError(
                f"{what}: tensor {key!r} has shape {tuple(value.shape)}, the adapter was built with "
                f"{expected[key]}; nothing was written"
            )
    if expected is not None:
        missing = sorted(set(expected) - set(state))
        if missing:
            raise SaveError(f"{what}: tensors {missing[:3]} are missing; nothing was written")


def record_shapes(model: nn.Module, adapter_name: str) -> None:
    """Remember the full shapes of the adapter's tensors (before any sharding), for `check_saveable`."""
    model._deltatune_adapter_shapes = shapes(model.adapter_state_dict(adapter_name))


def recorded_shapes(model: nn.Module) -> dict[str, tuple[int, ...]] | None:
    return getattr(model, "_deltatune_adapter_shapes", None)


# -- mode and resume across world sizes --------------------------------------------------------
def resolve_mode(args: Any) -> str | None:
    """--distributed, else the mode of --accelerate-config; refuses the two disagreeing."""
    mode = args.distributed
    if args.accelerate_config:
        from_file, _ = mode_from_accelerate_config(args.accelerate_config)
        if mode is not None and mode != from_file:
            raise ConfigError(
                f"--distributed {mode} disagrees with --accelerate-config {args.accelerate_config} ({from_file}); give one"
            )
        mode = from_file
    if mode == "fsdp" and getattr(args, "quantize", None):
        raise ConfigError(
            f"--distributed fsdp with --quantize {args.quantize} is not supported yet (the packed bitsandbytes "
            "weights need bnb_4bit_quant_storage set to shard, not yet wired or measured); use --distributed ddp "
            "for QLoRA on several GPUs"
        )
    return mode


def _global(layout: dict) -> int:
    return int(layout.get("batch_size", 0)) * int(layout.get("grad_accum", 0)) * int(layout.get("world_size", 1))


def remapped(old: dict, new: dict, saved_fingerprint: str | None, fingerprint_of, log) -> bool:
    """Whether a checkpoint of another world size maps exactly onto this run's data stream.

    The stream is a pure function of (rows, seed, global batch, length options): a step reads
    global batch rows from the same cursor, whatever the split into processes and micro-batches.
    So a checkpoint maps when the global batch (batch_size x grad_accum x processes) is equal and
    the rows are the same (its fingerprint under its own layout matches).

    Raises:
        ResumeError: same rows, another world size, but another global batch (the fix in the message).
    """
    from deltatune.train.errors import ResumeError

    same_options = all(old.get(k) == new.get(k) for k in ("group_by_length", "split_by_length"))
    if not old or not same_options or fingerprint_of(old) != saved_fingerprint:
        return False
    if _global(old) != _global(new):
        if old.get("world_size") == new.get("world_size"):
            return False
        raise ResumeError(
            f"cannot resume on {new['world_size']} processes: the checkpoint's global batch is {_global(old)} "
            f"(batch_size {old['batch_size']} x grad_accum {old['grad_accum']} x {old['world_size']} processes), this "
            f"run's {_global(new)}; keep batch_size x grad_accum x processes equal (e.g. --batch-size "
            f"{_global(old) // (new['grad_accum'] * new['world_size']) or 1}) so no example is skipped or repeated"
        )
    if old != new:
        log(f"resuming a {old['world_size']}-process checkpoint on {new['world_size']} processes: same global "
            f"batch {_global(new)}, so the data cursor maps exactly (no example skipped or repeated)")  # fmt: skip
    return True
