"""Fixtures for training tests: tiny model folder + synthetic data, built once per session."""

from __future__ import annotations

import pytest
from train_helpers import make_assets


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
