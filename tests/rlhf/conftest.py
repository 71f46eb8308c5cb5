"""Tiny offline assets for preference-training tests (the training tests' tokenizer and Llama)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_accelerate_state():
    """TRL's trainers set up accelerate's process-wide state (use_cpu=True); an in-process
    `deltatune rlhf` afterwards builds its own Accelerator, which refuses a changed state."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    yield
