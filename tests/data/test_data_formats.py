"""Each source format converts to its canonical form, read from small local files we write here."""

from __future__ import annotations

import csv
import json

import pytest
from data_helpers import write_jsonl

from deltatune.data import DataError, convert, load_rows
from deltatune.data.report import RowError


def test_alpaca_jsonl_with_input_system_and_history(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
            {"instruction": "Greet", "input": "", "output": "Hi", "system": "Be brief"},
            {"instruction": "And now?", "output": "Still here", "history": [["Are you there?", "Yes"]]},
        ],
    )
    rows, report = load_rows(str(path))
    assert report.kept == 3 and report.bad == 0
    assert rows[0] == {"messages": [{"role": "user", "content": "Add\n2 and 3"}, {"role": "assistant", "content": "5"}]}
    assert rows[1]["messages"][0] == {"role": "system", "content": "Be brief"}
    assert [m["role"] for m in rows[2]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert rows[2]["messages"][1]["content"] == "Yes"


def test_alpaca_column_map_template_and_prefix_options():
    options = {
        "columns": {"prompt": "instruction", "completion": "output"},
        "input_prefix": "输入：",
        "instruction_template": "Task: {instruction} {x}",
    }
    row = convert({"prompt": "translate", "input": "输入：猫", "completion": "cat"}, "alpaca", options)
    # The literal "{x}" survives: templates use str.replace, never str.format on data.
    assert row["messages"][0]["content"] == "Task: translate {x}\n猫"
    assert row["messages"][1]["content"] == "cat"


def test_sharegpt_json_array_with_from_value_turns(tmp_path):
    data = [
        {
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": "q1"},
                {"from": "gpt", "value": "a1"},
                {"from": "human", "value": "q2"},
                {"from": "gpt", "value": "a2"},
            ]
        }
    ]
    path = tmp_path / "share.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    rows, _ = load_rows(str(path))
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert rows[0]["messages"][4]["content"] == "a2"


def test_sharegpt_string_encoded_pairs_and_custom_keys():
    # huangjintao/sharegpt stores a Python-literal string of {human, assistant} rounds.
    row = {"conversation": "[{'human': 'hi', 'assistant': 'hello'}, {'human': 'bye', 'assistant': 'ciao'}]"}
    out = convert(row, "sharegpt", {"conversations_key": "conversation"})
    assert [m["content"] for m in out["messages"]] == ["hi", "hello", "bye", "ciao"]
    row = {"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}]}
    out = convert(row, "sharegpt", {"conversations_key": "chat_rounds"})
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]


def test_sharegpt_string_that_is_code_is_rejected_not_run():
    row = {"conversations": "__import__('os').getcwd()"}
    with pytest.raises(RowError) as err:
        convert(row, "sharegpt", {})
    assert err.value.reason == "wrong_type"


def test_messages_format(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "extra": 1}],
    )
    rows, _ = load_rows(str(path))
    assert rows == [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]


def test_classification_csv_and_pair(tmp_path):
    path = tmp_path / "cls.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([["good film", "pos"], ["bad film", "neg"]])
    rows, _ = load_rows(str(path))
    assert rows == [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    out = convert(
        {"sentence1": "a", "sentence2": "b", "label": 2},
        "classification",
        {"columns": {"sentence1": "text", "sentence2": "text_pair"}},
    )
    assert out == {"text": "a", "label": 2, "text_pair": "b"}


def test_ner_parquet_and_length_mismatch(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(
        [
            {"tokens": ["张三", "在", "北京"], "tags": ["B-PER", "O", "B-LOC"]},
            {"tokens": ["x", "y"], "tags": ["O"]},
        ]
    )
    path = tmp_path / "ner.parquet"
    pq.write_table(table, path)
    rows, report = load_rows(str(path))
    assert rows == [{"tokens": ["张三", "在", "北京"], "tags": ["B-PER", "O", "B-LOC"]}]
    assert report.reasons == {"wrong_type": 1}


def test_image_caption_format():
    out = convert(
        {"image": {"path": "/img/1.jpg"}, "caption": "a cat&&a small cat"},
        "image-caption",
        {"caption_separator": "&&", "prompt": "describe"},
    )
    assert out["images"] == ["/img/1.jpg"]
    assert out["messages"] == [
        {"role": "user", "content": "<image>describe"},
        {"role": "assistant", "content": "a cat"},
    ]


def test_forced_format_and_undetectable_columns(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"q": "x", "a": "y"}])
    with pytest.raises(DataError, match=r"cannot tell the data format from columns \['a', 'q'\]"):
        load_rows(str(path))
    path = write_jsonl(tmp_path / "qr.jsonl", [{"query": "x", "response": "y"}])
    rows, _ = load_rows(str(path), format="alpaca")
    assert rows[0]["messages"][1]["content"] == "y"
