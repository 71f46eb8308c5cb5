"""Each tuner learns: 30 Adam steps on a tiny fixed task cut the loss by a clear margin.

The task: regress a fixed batch onto the outputs of a second, differently seeded network of the
same shape (scaled up so the gap is large). The student has a LayerNorm so LN-tuning has something
to train. A tuner that trains nothing, or whose gradients do not reach its tensors, fails here.
"""

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.testing.tiny_models import TINY_MODELS

STEPS = 30
MIN_DROP = 0.3


class NormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 32)
        self.norm = nn.LayerNorm(32)
        self.lin1 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.norm(self.lin0(x))))))


def _regression_losses(config, lr: float) -> tuple[float, float]:
    torch.manual_seed(0)
    tuned = dt.get_tuned_model(NormMLP(), config)
    torch.manual_seed(1)
    teacher = NormMLP()
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = teacher(x) * 4  # (64, 3)
    tuned.train()
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(tuned(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


CASES = {
    "lora": (dt.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8), 5e-2),
    "ia3": (dt.IA3Config(target_modules=["lin0", "lin1", "head"], feedforward_modules=["lin1"]), 1e-1),
    "bitfit": (dt.BitFitConfig(), 1e-1),
    "ln_tuning": (dt.LNTuningConfig(), 1e-1),
    "part": (dt.PartConfig(target_parameters=r"lin1\..*"), 3e-2),
    "full": (dt.FullConfig(), 1e-2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tuner_learns_regression(name):
    config, lr = CASES[name]
    first, last = _regression_losses(config, lr)
    assert last <= (1 - MIN_DROP) * first, f"{name}: loss {first:.4f} -> {last:.4f} after {STEPS} steps"


def test_full_learns_causal_lm_on_tiny_llama():
    """Replaced parameters train through a real transformers model (tied, norm and embedding layers)."""
    tiny = TINY_MODELS["llama"]
    tuned = dt.get_tuned_model(tiny.fresh(), dt.FullConfig(task_type="CAUSAL_LM"))
    tuned.train()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = tuned(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= (1 - MIN_DROP) * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
