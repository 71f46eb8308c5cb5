"""Run by tests/train/test_distributed.py under torch.distributed.run: two AdamW steps of LoRA, DoRA
and IA3 under deltatune's FSDP2 layout on this rank's slice of a batch; rank 0 saves the gathered
adapters (safetensors) to argv[1]. With no process group (one process) it trains unsharded. Sharded,
it also checks that a resume from gathered state into fresh shards is bit-identical."""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))

from train_helpers import build_model  # noqa: E402

from deltatune.core.registry import get_spec  # noqa: E402
from deltatune.core.tuned_model import get_tuned_model  # noqa: E402
from deltatune.train import distributed as dist  # noqa: E402

CONFIGS = {
    "lora": ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "dora": ("lora", {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}),
    "ia3": ("ia3", {"target_modules": ["q_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
}


def build(kind: str, world: int):
    tuner, fields = CONFIGS[kind]
    torch.manual_seed(0)
    tuned = get_tuned_model(build_model(320), get_spec(tuner).config(task_type="CAUSAL_LM", **fields))
    with torch.no_grad():  # a non-zero start, so every tensor gets a gradient
        for param in tuned.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    if world > 1:
        dist.record_shapes(tuned, "default")
        dist.shard_fsdp2(tuned, torch.device("cpu"), world)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    return tuned, optimizer


def steps(tuned, optimizer, rank: int, world: int, count: int = 2) -> None:
    batch = torch.randint(0, 320, (4, 12), generator=torch.Generator().manual_seed(1))
    mine = batch.chunk(world)[rank]  # equal token counts: the mean over ranks is the full batch's mean
    for _ in range(count):
        tuned(input_ids=mine, labels=mine).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def gathered(tuned) -> dict[str, torch.Tensor]:
    with dist.full_view(tuned):
        return {k: v.detach().clone().contiguous() for k, v in tuned.adapter_state_dict("default").items()}


def train(kind: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    tuned, optimizer = build(kind, world)
    steps(tuned, optimizer, rank, world)
    assert all(p.grad is None for p in tuned.parameters() if not p.requires_grad)  # frozen: no gradient
    state = gathered(tuned)
    if world > 1:
        dist.check_saveable(state, dist.recorded_shapes(tuned), kind)
        resume_is_exact(kind, tuned, optimizer, rank, world)
    return state


def resume_is_exact(kind: str, tuned, optimizer, rank: int, world: int) -> None:
    """Full adapter + optimizer state taken from the shards, loaded into a fresh sharded model and
    optimizer (as a checkpoint resume does): two more steps are bit-identical to continuing."""
    with dist.full_view(tuned, optimizer) as full:
        weights = {k: v.detach().clone() for k, v in tuned.adapter_state_dict("default").items()}
        saved = full.state_dict()
        saved = {"state": {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                           for i, s in saved["state"].items()}, "param_groups": saved["param_groups"]}  # fmt: skip
    steps(tuned, optimizer, rank, world)
    fresh, fresh_optimizer = build(kind, world)
    with dist.full_view(fresh):
        fresh.load_adapter_state_dict("default", weights)
    fresh_optimizer.load_state_dict(saved)
    dist.reshard_optimizer_state(fresh_optimizer)
    steps(fresh, fresh_optimizer, rank, world)
    continued, resumed = gathered(tuned), gathered(fresh)
    for key in continued:
        assert torch.equal(continued[key], resumed[key]), f"{kind}: {key} differs after resume"


if __name__ == "__main__":
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    for kind in CONFIGS:
        state = train(kind, rank, world)
        if rank == 0:
            save_file(state, os.path.join(sys.argv[1], f"{kind}-{world}.safetensors"))
