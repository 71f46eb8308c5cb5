"""The dataset catalogue: `catalog.yaml` parsed into checked `DatasetSpec` records.

The YAML is data only (yaml.safe_load: no tags, no objects), and every entry is checked against
an allowlist of keys and types here, so a typo in the catalogue fails at import of the first
lookup with the entry and key named, not deep inside a training run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from deltatune.data.formats import FORMATS
from deltatune.data.report import DataError


@dataclass(frozen=True)
class DatasetSpec:
    """One catalogue entry; see the header of catalog.yaml for what each field means."""

    name: str
    format: str
    ms_id: str | None = None
    hf_id: str | None = None
    subsets: tuple[str, ...] = ()
    split: tuple[str, ...] = ("train",)
    data_files: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    sample: int | None = None
    builtin: str | None = None
    requires: str | None = None
    license: str = "check the dataset card"
    offline: bool = False

    @property
    def converter_options(self) -> dict[str, Any]:
        """Options handed to formats.convert (the column map travels with them)."""
        return {**self.options, "columns": self.columns}


# key -> accepted YAML types; anything else in an entry is an error.
_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "ms_id": (str, type(None)),
    "hf_id": (str, type(None)),
    "subsets": (list,),
    "split": (list,),
    "data_files": (str, type(None)),
    "columns": (dict,),
    "options": (dict,),
    "sample": (int, type(None)),
    "builtin": (str, type(None)),
    "requires": (str, type(None)),
    "license": (str,),
    "offline": (bool,),
}


def _parse_entry(name: str, entry: Any) -> DatasetSpec:
    where = f"catalog entry {name!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}; allowed: {sorted(_FIELDS)}")
    for key, value in entry.items():
        if not isinstance(value, _FIELDS[key]):
            raise DataError(f"{where}: {key} must be {_FIELDS[key][0].__name__}, got {type(value).__name__}")
    if entry.get("format") not in FORMATS:
        raise DataError(f"{where}: format must be one of {FORMATS}, got {entry.get('format')!r}")
    offline = entry.get("offline", False)
    if offline and not entry.get("builtin"):
        raise DataError(f"{where}: offline entries need a builtin loader")
    if not offline and not (entry.get("ms_id") or entry.get("hf_id")):
        raise DataError(f"{where}: a hub entry needs ms_id or hf_id")
    return DatasetSpec(
        name=name,
        **{k: tuple(v) if k in ("subsets", "split") else v for k, v in entry.items()},
    )


@functools.cache
def load_catalog() -> dict[str, DatasetSpec]:
    """Parse and check the packaged catalog.yaml (cached; it never changes at run time)."""
    text = resources.files("deltatune.data").joinpath("catalog.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise DataError("catalog.yaml must map dataset names to entries")
    return {str(name): _parse_entry(str(name), entry) for name, entry in raw.items()}


def list_datasets(*, offline_only: bool = False) -> list[DatasetSpec]:
    """All catalogue entries in file order; only the offline built-ins with offline_only."""
    return [spec for spec in load_catalog().values() if spec.offline or not offline_only]


def get_dataset_spec(name: str) -> DatasetSpec:
    """Look up one entry.

    Raises:
        DataError: unknown name (the message lists the offline built-ins and how to use a file).
    """
    catalog = load_catalog()
    if name not in catalog:
        offline = ", ".join(s.name for s in catalog.values() if s.offline)
        from deltatune.suggest import did_you_mean

        raise DataError(
            f"unknown dataset {name!r}: not in the catalogue and not an existing file "
            f"(.jsonl/.json/.csv/.parquet). {did_you_mean(name, catalog)}Offline built-ins: {offline}. "
            f"`deltatune datasets` lists every name."
        )
    return catalog[name]
