"""docs/tuners.md: every Python snippet runs as written (in order, in a scratch folder)."""

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tuners.md"


def test_tuners_page_snippets_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 5, "docs/tuners.md lost its snippets"
    for index, code in enumerate(blocks):
        exec(compile(code, f"docs/tuners.md[{index}]", "exec"), {"__name__": "__docs__"})
