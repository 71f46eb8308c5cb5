"""Read local data files into (row, location) pairs, reporting file-level problems.

Supported: .jsonl (one JSON object per line), .json (a top-level array), .csv (header row),
.parquet. Bytes are decoded here, not by `open()`, so a bad byte becomes a report entry
"file:line:byte" (1-based line, 1-based byte within that line) instead of an exception with
no position; a line that is not JSON becomes "file:line". Neither ever echoes the line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltatune.data.report import DataError, DataReport

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _decoded_lines(path: Path, report: DataReport) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) for lines that decode as UTF-8; report the others."""
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            report.total += 1
            report.add("non_utf8", f"{path}:{lineno}:{err.start + 1}", "invalid UTF-8 byte")
            continue
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # a BOM is valid, just not content
        yield lineno, text.rstrip("\r")


def read_jsonl(path: Path, report: DataReport) -> list[tuple[Any, str]]:
    rows = []
    for lineno, text in _decoded_lines(path, report):
        if not text.strip():
            continue  # blank lines (a trailing newline) are not rows
        try:
            rows.append((json.loads(text), f"{path}:{lineno}"))
        except json.JSONDecodeError as err:
            report.total += 1
            report.add("malformed_json", f"{path}:{lineno}", f"column {err.colno}: {err.msg}")
    return rows


def read_json(path: Path, report: DataReport) -> list[tuple[Any, str]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        # One bad byte poisons the whole document: report its position, keep nothing.
        line = data.count(b"\n", 0, err.start) + 1
        byte = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        report.total += 1
        report.add("non_utf8", f"{path}:{line}:{byte}", "invalid UTF-8 byte; whole file skipped")
        return []
    if not text.strip():
        return []
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        report.total += 1
        report.add("malformed_json", f"{path}:{err.lineno}", f"column {err.colno}: {err.msg}")
        return []
    if not isinstance(payload, list):
        raise DataError(
            f"{path}: a .json data file must hold a top-level array of rows, "
            f"got {type(payload).__name__}; use .jsonl for one object per line"
        )
    return [(row, f"{path}#{i}") for i, row in enumerate(payload)]


def read_csv(path: Path, report: DataReport) -> list[tuple[Any, str]]:
    # Lines with bad bytes are reported and left out before parsing; quoted cells spanning
    # such a line would be garbled anyway.
    good = [text for _, text in _decoded_lines(path, report)]
    reader = csv.DictReader(io.StringIO("\n".join(good), newline=""))
    rows = []
    for row in reader:
        if None in row:  # more cells than header names
            report.total += 1
            report.add("malformed_csv", f"{path}:{reader.line_num}", "more cells than columns")
            continue
        rows.append((dict(row), f"{path}:{reader.line_num}"))
    return rows


def read_parquet(path: Path, report: DataReport) -> list[tuple[Any, str]]:
    import pyarrow.parquet as pq  # lazy: only parquet users need pyarrow

    return [(row, f"{path}#{i}") for i, row in enumerate(pq.read_table(path).to_pylist())]


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def read_local(path: Path, report: DataReport) -> list[tuple[Any, str]]:
    """Read one local file; counts bad lines in `report` and notes an empty file.

    Raises:
        DataError: missing file or unsupported suffix.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported data file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    rows = reader(path, report)
    if not rows and not report.bad:
        report.add("empty_file", str(path), "no rows")
    return rows
