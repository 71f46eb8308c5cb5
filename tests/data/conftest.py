"""Fixtures for the data tests (tiny offline tokenizers)."""

from __future__ import annotations

import pytest
from data_helpers import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_pad_is_eos():
    return build_tiny_tokenizer(pad_is_eos=True)


@pytest.fixture(scope="session")
def tokenizer_without_template():
    return build_tiny_tokenizer(chat_template=None)
