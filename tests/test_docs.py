"""The README's and docs' Python snippets run as written (in order, in a scratch folder)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/usage.md"]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_snippets_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks(page)
    assert blocks, f"{page} has no python snippet"
    for index, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page}[{index}]", "exec"), {"__name__": "__docs__"})
        except Exception as exc:  # noqa: BLE001 - report which snippet failed
            pytest.fail(f"{page} snippet {index} failed: {type(exc).__name__}: {exc}")
