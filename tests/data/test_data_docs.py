"""Every Python snippet in docs/datasets.md runs (the docs promise they do)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "datasets.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S) if DOC.exists() else []


def test_docs_have_snippets():
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_doc_snippet_runs(index, monkeypatch, capsys):
    if importlib.util.find_spec("chatterbot_corpus") is None and "chatterbot" in SNIPPETS[index]:
        pytest.skip("chatterbot-corpus not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    if importlib.util.find_spec("sklearn") is None and 'load_rows("digits' in SNIPPETS[index]:
        pytest.skip("scikit-learn not installed: pip install scikit-learn")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(SNIPPETS[index], f"{DOC}:snippet{index}", "exec"), {})
