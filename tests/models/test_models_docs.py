"""docs/models.md: its Python snippets run, and its table lists every registry entry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deltatune.models import MODELS

PAGE = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_snippets_run(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    for index, code in enumerate(blocks):
        try:
            exec(compile(code, f"models.md[{index}]", "exec"), {"__name__": "__docs__"})
        except Exception as exc:  # noqa: BLE001 - report which snippet failed
            pytest.fail(f"docs/models.md snippet {index} failed: {type(exc).__name__}: {exc}")


def test_table_lists_every_model():
    text = PAGE.read_text(encoding="utf-8")
    for spec in MODELS.values():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{spec.name}` |")), None)
        assert row is not None, f"docs/models.md has no row for {spec.name}"
        assert (spec.hf_id or "-") in row and (spec.ms_id or "-") in row
