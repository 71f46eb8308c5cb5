"""CLI tests reuse the tiny training assets (tests/train/train_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from train_helpers import make_assets  # noqa: E402


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and shared CI cores lose a lot to oversubscription."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
