"""docs/serving.md's Python snippet runs as written against a live `deltatune serve` (port and names swapped in)."""

import re
from pathlib import Path

import pytest

pytest.importorskip("openai")

PAGE = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_serving_snippet_runs_against_the_server(server, capsys):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    client_code = next(b for b in blocks if "OpenAI(" in b)
    code = (
        client_code.replace("http://127.0.0.1:8000", server)
        .replace('"support"', '"alpha"')
        .replace('"legal"', '"beta"')
    )
    exec(compile(code, "docs/serving.md", "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    assert "['tiny-llama', 'alpha', 'beta', 'gamma']" in printed and "completion_tokens=" in printed
