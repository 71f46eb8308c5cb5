"""The reliability catalogue in docs/security.md names, for every row, tests that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows() -> list[tuple[str, list[str]]]:
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    section = text.split("## The reliability catalogue, row by row", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("catalogue row", "---"):
            rows.append((cells[0], re.findall(r"`(tests/[^`:]+::test_\w+)`", cells[1])))
    return rows


def test_every_catalogue_row_names_existing_tests():
    rows = _rows()
    assert len(rows) >= 20
    for row, tests in rows:
        assert tests, f"catalogue row without a test: {row}"
        for node in tests:
            path, name = node.split("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", source, flags=re.M), f"{node} (row: {row}) does not exist"
