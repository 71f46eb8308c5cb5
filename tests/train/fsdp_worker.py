"""Run by tests/train/test_distributed.py under torch.distributed.run: two AdamW steps of LoRA, DoRA
and IA3 under deltatune's FSDP2 layout on this rank's slice of a batch; rank 0 saves the gathered
adapters (safetensors) to argv[1]. With no process group (one process) it trains unsharded."""

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


def train(kind: str, rank: int, world: int) -> dict[str, torch.Tensor]:
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
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    batch = torch.randint(0, 320, (4, 12), generator=torch.Generator().manual_seed(1))
    mine = batch.chunk(world)[rank]  # equal token counts: the mean over ranks is the full batch's mean
    for _ in range(2):
        tuned(input_ids=mine, labels=mine).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in tuned.parameters() if not p.requires_grad)  # frozen: no gradient
    with dist.full_view(tuned):
        state = {k: v.detach().clone().contiguous() for k, v in tuned.adapter_state_dict("default").items()}
    if world > 1:
        dist.check_saveable(state, dist.recorded_shapes(tuned), kind)
    return state


if __name__ == "__main__":
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    for kind in CONFIGS:
        state = train(kind, rank, world)
        if rank == 0:
            save_file(state, os.path.join(sys.argv[1], f"{kind}-{world}.safetensors"))
