"""Turn a dataset spec string into validated canonical rows, before any model is loaded.

Spec grammar: comma-separated sources, each a catalogue name or a local file path
(.jsonl/.json/.csv/.parquet), optionally followed by "#N" to sample N valid rows with a seeded
RNG (N larger than the source upsamples: every row once, the rest drawn with replacement):

    "chatterbot-en"                       all unique chatterbot pairs
    "chatterbot-en#200,data/mine.jsonl"   200 sampled pairs, then every row of a local file
    "ms://owner/name#500"                 a ModelScope data set repo's data file (deltatune/export/download.py)

Every source is read, converted to the canonical form of its format and validated row by row;
problems are counted per reason in a DataReport, and a source fails as a whole (DataError)
when it has no valid rows or more than `max_bad_fraction` invalid ones.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from deltatune.data.builtin import BUILTINS
from deltatune.data.catalog import DatasetSpec, get_dataset_spec, list_datasets
from deltatune.data.formats import FORMATS, convert, detect_format
from deltatune.data.readers import LOCAL_SUFFIXES, read_local
from deltatune.data.report import DataError, DataReport, RowError

Row = dict[str, Any]
T = TypeVar("T")
_OFFLINE_ENV = ("DELTATUNE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class Source:
    """One comma-separated part of a spec: a name or path, and an optional sample size."""

    name: str
    sample: int | None = None


def parse_spec(spec: str) -> list[Source]:
    """Split "a#N,b" into sources.

    Raises:
        DataError: empty spec/part, or a "#N" that is not a positive integer.
    """
    sources = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            raise DataError(f"empty entry in dataset spec {spec!r}")
        name, hash_sign, count = part.rpartition("#")
        if not hash_sign:
            sources.append(Source(part))
            continue
        if not re.fullmatch(r"[0-9]+", count) or int(count) == 0 or not name:
            raise DataError(f"bad sample size in {part!r}: write NAME#N with N a positive integer")
        sources.append(Source(name, int(count)))
    return sources


def is_offline() -> bool:
    """True when the environment forbids hub access (HF_HUB_OFFLINE=1 and friends)."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in _OFFLINE_ENV)


def _offline_fix() -> str:
    builtins = ", ".join(spec.name for spec in list_datasets(offline_only=True))
    return f"use a local file (.jsonl/.json/.csv/.parquet) or an offline built-in ({builtins})"


def _load_hub(spec: DatasetSpec, *, offline: bool, hub: str | None) -> list[tuple[Any, str]]:
    """Rows of a hub dataset via datasets.load_dataset (or ModelScope when hub="ms")."""
    hub = hub or os.environ.get("DELTATUNE_HUB") or ("hf" if spec.hf_id else "ms")
    if hub not in ("hf", "ms"):
        raise DataError(f"hub must be 'hf' or 'ms', got {hub!r}")
    repo = spec.hf_id if hub == "hf" else spec.ms_id
    hub_name = "Hugging Face" if hub == "hf" else "ModelScope"
    if repo is None:
        other = "ms" if hub == "hf" else "hf"
        raise DataError(f"dataset {spec.name!r} has no {hub_name} id in the catalogue; try hub={other!r}")
    if offline:
        raise DataError(
            f"dataset {spec.name!r} must be downloaded from the {hub_name} hub ({repo}), but this "
            f"run is offline; {_offline_fix()}"
        )
    rows: list[tuple[Any, str]] = []
    for subset in spec.subsets or (None,):
        for split in spec.split:
            label = f"{spec.name}[{subset + '/' if subset else ''}{split}]"
            try:
                if hub == "hf":
                    import datasets  # lazy: hub users only

                    data = datasets.load_dataset(repo, name=subset, split=split, data_files=spec.data_files)
                else:
                    from modelscope import MsDataset  # lazy and optional

                    data = MsDataset.load(repo, subset_name=subset or "default", split=split)
            except ImportError as err:
                package = "datasets" if hub == "hf" else "modelscope"
                raise DataError(f"loading {spec.name!r} from {hub_name} needs `pip install {package}`") from err
            except Exception as err:  # network, auth, missing split: all mean "cannot load"
                first_line = str(err).splitlines()[0] if str(err) else ""
                raise DataError(
                    f"could not load dataset {spec.name!r} from the {hub_name} hub ({repo}, "
                    f"{label}): {type(err).__name__}: {first_line}; {_offline_fix()}"
                ) from err
            rows += [(row, f"{label}#{i}") for i, row in enumerate(data)]
    return rows


def _matches_filter(row: Any, rule: Mapping[str, str]) -> bool:
    value = row.get(rule["field"]) if isinstance(row, Mapping) else None
    return isinstance(value, str) and re.search(rule["pattern"], value) is not None


def sample_rows(rows: Sequence[T], n: int, rng: random.Random) -> list[T]:
    """n rows: a random subset if n <= len(rows), else every row once plus draws with replacement."""
    if not rows:
        return []
    if n <= len(rows):
        return [rows[i] for i in rng.sample(range(len(rows)), n)]
    order = list(range(len(rows)))
    rng.shuffle(order)
    order += rng.choices(range(len(rows)), k=n - len(rows))
    return [rows[i] for i in order]


def load_source(
    source: Source,
    *,
    seed: int = 42,
    offline: bool | None = None,
    hub: str | None = None,
    format: str | None = None,
    max_bad_fraction: float = 0.5,
    catalog: Mapping[str, DatasetSpec] | None = None,
) -> tuple[list[Row], DataReport]:
    """Load, convert, validate and sample one source. See load_rows for the arguments."""
    offline = is_offline() if offline is None else offline
    report = DataReport(source=source.name)
    path = Path(source.name)
    if source.name.startswith(("ms://", "modelscope://")):  # a ModelScope data set repo (or one file in it)
        from deltatune.export.download import download_dataset

        path = download_dataset(source.name, offline=offline)
    options: dict[str, Any] = {}
    default_sample = None
    if path.suffix.lower() in LOCAL_SUFFIXES or path.is_file():
        raw = read_local(path, report)
        first = next((row for row, _ in raw if isinstance(row, Mapping)), None)
        fmt = format or (detect_format(first) if first is not None else None)
        if fmt is None and raw:
            keys = sorted(first) if first is not None else []
            raise DataError(
                f"{path}: cannot tell the data format from columns {keys}; rename columns to "
                f"messages | conversations | instruction+output | text+label | tokens+tags | "
                f"image+caption | image+label, "
                f"or pass format= one of {FORMATS}"
            )
    else:
        spec = catalog[source.name] if catalog and source.name in catalog else get_dataset_spec(source.name)
        fmt, options, default_sample = spec.format, spec.converter_options, spec.sample
        if spec.builtin:
            raw, notes = BUILTINS[spec.builtin](spec.options)
            report.notes += notes
        else:
            raw = _load_hub(spec, offline=offline, hub=hub)
        rule = options.get("keep_if_matches")
        if rule:
            before = len(raw)
            raw = [(row, where) for row, where in raw if _matches_filter(row, rule)]
            report.notes.append(f"catalogue filter kept {len(raw)} of {before} rows")
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"format must be one of {FORMATS}, got {fmt!r}")
    rows: list[Row] = []
    for row, where in raw:
        report.total += 1
        try:
            rows.append(convert(row, fmt, options))
        except RowError as err:
            report.add(err.reason, where, err.detail)
    report.kept = len(rows)
    report.check(max_bad_fraction)
    n = source.sample or default_sample
    if n is not None and n != len(rows):
        # Seeded per source name, so adding a source to a mix does not change another's sample.
        rows = sample_rows(rows, n, random.Random(f"{seed}:{source.name}"))
        report.notes.append(f"sampled {n} of {report.kept} valid rows" + (" (upsampled)" if n > report.kept else ""))
    return rows, report


def _row_kind(row: Row) -> str:
    if "prompt" in row:  # preference / kto / prompt-only rows (deltatune/data/preference.py)
        return "preference" if "chosen" in row else "kto" if "completion" in row else "prompt-only"
    if "messages" in row:
        return "chat"
    return "ner" if "tokens" in row else "image" if "image" in row else "classification"


def load_rows(
    spec: str,
    *,
    seed: int = 42,
    offline: bool | None = None,
    hub: str | None = None,
    format: str | None = None,
    max_bad_fraction: float = 0.5,
    catalog: Mapping[str, DatasetSpec] | None = None,
) -> tuple[list[Row], DataReport]:
    """Load every source in `spec`, validated, sampled and concatenated in spec order.

    Args:
        spec: "name[#N][,name[#N]...]"; a name is a catalogue entry or a local file path.
        seed: seeds "#N" sampling (per source name).
        offline: refuse hub downloads; None reads HF_HUB_OFFLINE / HF_DATASETS_OFFLINE /
            DELTATUNE_OFFLINE from the environment.
        hub: "hf" or "ms" for catalogue entries; default DELTATUNE_HUB, else hf when an hf_id exists.
        format: force the format of local files (default: detected from the first row's keys).
        max_bad_fraction: per source, the largest tolerated share of invalid rows.
        catalog: extra/overriding catalogue entries by name (own data sets, tests).

    Returns:
        (rows in canonical form, merged DataReport).

    Raises:
        DataError: unknown name, unreadable file, hub unreachable or offline, undetectable
            format, no valid rows or too many invalid rows in a source.
    """
    report = DataReport(source=spec)
    rows: list[Row] = []
    kinds: dict[str, str] = {}
    for source in parse_spec(spec):
        part_rows, part_report = load_source(
            source,
            seed=seed,
            offline=offline,
            hub=hub,
            format=format,
            max_bad_fraction=max_bad_fraction,
            catalog=catalog,
        )
        if part_rows:
            kinds[source.name] = _row_kind(part_rows[0])
        if len(set(kinds.values())) > 1:
            raise DataError(f"cannot mix row kinds in one spec: {kinds}; load them separately")
        rows += part_rows
        report.merge(part_report)
    return rows, report


DEFAULT_VAL_ROWS = 200
"""Held-out rows of a run that does not choose: this many, at most a fifth of the data."""


def choose_val_size(n_rows: int, val_size: float | int | None) -> tuple[float | int, str | None]:
    """(held-out size to use, a note saying what was chosen or None) for `n_rows` valid rows.

    None means the default: DEFAULT_VAL_ROWS rows, capped at a fifth of the data so small files
    keep most of their rows for training (none held out below 5 rows). An explicit size is used
    as given (train_val_split refuses an impossible one).
    """
    if val_size is not None:
        return val_size, None
    chosen = min(DEFAULT_VAL_ROWS, n_rows // 5)
    if chosen == DEFAULT_VAL_ROWS:
        return chosen, None
    if chosen == 0:
        return 0, f"held-out split: none ({n_rows} rows are too few to hold any out; set --val-size to choose)"
    return chosen, (
        f"held-out split: {chosen} of {n_rows} rows (the default {DEFAULT_VAL_ROWS}, capped at a fifth of the data; "
        "set --val-size to choose)"
    )


def train_val_split(rows: Sequence[T], val_size: float | int | None, seed: int = 42) -> tuple[list[T], list[T]]:
    """Deterministic shuffle-and-split: same rows, size and seed give the same split.

    Args:
        val_size: a fraction in (0, 1) (rounded, at least one row) or a row count >= 1; None: the
            default of choose_val_size.

    Raises:
        DataError: the split would leave the training or validation side empty.
    """
    n = len(rows)
    if val_size is None:
        val_size = choose_val_size(n, None)[0]
        if not val_size:
            return list(rows), []
    if isinstance(val_size, float) and not isinstance(val_size, bool):
        if not 0.0 < val_size < 1.0:
            raise DataError(f"val_size as a fraction must be in (0, 1), got {val_size}")
        n_val = max(1, round(n * val_size))
    elif isinstance(val_size, int) and val_size >= 1:
        n_val = val_size
    else:
        raise DataError(f"val_size must be a fraction in (0, 1) or a count >= 1, got {val_size!r}")
    if n_val >= n:
        raise DataError(
            f"--val-size {val_size!r} leaves no training rows out of {n}; give a smaller count or a fraction "
            "(e.g. 0.1), or leave it unset to hold out a fifth of small data"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]
