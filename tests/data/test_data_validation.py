"""The validation pass: every reason is counted with its location, raw content never appears,
and a source fails as a whole when too much of it is bad."""

from __future__ import annotations

import json

import pytest
from data_helpers import write_jsonl

from deltatune.data import DataError, load_rows

SECRET = "SECRET-ROW-CONTENT"
GOOD = {"instruction": f"{SECRET} q", "output": f"{SECRET} a"}


def _lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_each_reason_is_counted_once_with_its_location(tmp_path):
    path = _lines(
        tmp_path / "mixed.jsonl",
        [json.dumps(GOOD).encode()] * 12
        + [
            json.dumps({"instruction": SECRET}).encode(),  # line 13: missing output
            json.dumps({"instruction": SECRET, "output": None}).encode(),  # 14: null
            json.dumps({"instruction": SECRET, "output": 7}).encode(),  # 15: wrong type
            json.dumps({"instruction": "   ", "output": SECRET}).encode(),  # 16: empty turn
            json.dumps({"messages": [{"role": "wizard", "content": SECRET}]}).encode(),  # 17
            b'{"instruction": "' + SECRET.encode() + b'", "output": ',  # 18: malformed JSON
            b'{"instruction": "caf\xe9", "output": "x"}',  # 19: latin-1 byte at byte 21
        ],
    )
    rows, report = load_rows(str(path), format="alpaca")
    assert len(rows) == 12 and report.kept == 12 and report.total == 19
    assert report.reasons == {
        "null_value": 1,
        "wrong_type": 1,
        "empty_turn": 1,
        # line 13 lacks output; line 17 (messages-shaped) lacks instruction under format=alpaca
        "missing_field": 2,
        "malformed_json": 1,
        "non_utf8": 1,
    }
    assert report.examples["non_utf8"] == [f"{path}:19:21 (invalid UTF-8 byte)"]
    assert report.examples["malformed_json"][0].startswith(f"{path}:18 (")
    assert report.examples["null_value"] == [f"{path}:14 (field 'output')"]
    assert report.examples["wrong_type"] == [f"{path}:15 (field 'output' is int)"]
    assert SECRET not in report.summary()


def test_unknown_role_is_reported_by_name_without_content(tmp_path):
    path = write_jsonl(
        tmp_path / "roles.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3
        + [{"messages": [{"role": "user", "content": SECRET}, {"role": "wizard", "content": SECRET}]}],
    )
    _, report = load_rows(str(path))
    assert report.reasons == {"unknown_role": 1}
    assert report.examples["unknown_role"] == [f"{path}:4 (messages[1] has role 'wizard')"]
    assert SECRET not in report.summary()


def test_turn_order_and_missing_assistant(tmp_path):
    path = write_jsonl(
        tmp_path / "order.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 4
        + [
            {"messages": [{"role": "user", "content": "q"}]},
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            },
        ],
    )
    _, report = load_rows(str(path))
    assert report.reasons == {"no_assistant_turn": 1, "bad_turn_order": 2}


def test_too_many_bad_rows_fails_with_summary(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD] * 2 + [{"instruction": SECRET}] * 3)
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    message = str(err.value)
    assert "3 of 5 rows" in message and "max_bad_fraction=0.5" in message
    assert "missing_field: 3" in message and SECRET not in message
    rows, report = load_rows(str(path), max_bad_fraction=0.7)  # the threshold is configurable
    assert len(rows) == 2 and report.bad == 3


def test_all_rows_invalid_fails(tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [{"instruction": "q", "output": None}])
    with pytest.raises(DataError, match="no valid rows"):
        load_rows(str(path), max_bad_fraction=1.0)


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert "no valid rows" in str(err.value) and f"empty_file: 1  e.g. {path}" in str(err.value)


def test_non_utf8_in_json_array_reports_line_and_byte(tmp_path):
    path = tmp_path / "arr.json"
    # line 3 is `  {"instruction": "\xff"}`: the bad byte is the 20th byte of that line
    path.write_bytes(b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "\xff"}\n]\n')
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert f"{path}:3:20 (invalid UTF-8 byte" in str(err.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown dataset 'no-such-set'.*chatterbot-en"):
        load_rows("no-such-set")
