"""Data errors and the per-reason report every loading/encoding step fills in.

The report is the one place bad rows are accounted for: each problem is counted under a short
reason key ("missing_field", "non_utf8", ...) with a few example *locations* (file:line,
file:line:byte, dataset#row) and a short detail that names fields and types, never row content,
so a report can go into logs of runs on private data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_EXAMPLES_PER_REASON = 5
"""Locations kept per reason; enough to find the pattern without flooding the log."""


class DataError(ValueError):
    """A data set cannot be used as given; the message names the source and the fix."""


class RowError(ValueError):
    """One row is unusable; `reason` is a report key, `detail` names fields/types, not content."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DataReport:
    """Counts of kept and rejected rows per reason, with example locations."""

    source: str = ""
    total: int = 0
    """Rows (or lines) seen, good and bad."""
    kept: int = 0
    """Rows that passed every check."""
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Facts worth a line in the log that are not errors (deduplicated pairs, upsampling)."""

    @property
    def bad(self) -> int:
        return sum(self.reasons.values())

    def add(self, reason: str, where: str, detail: str = "") -> None:
        """Count one rejected row under `reason`; keep `where` (+ `detail`) as an example."""
        self.reasons[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES_PER_REASON:
            shown.append(f"{where} ({detail})" if detail else where)

    def merge(self, other: DataReport) -> None:
        """Fold another report (e.g. one per mixed source) into this one."""
        self.total += other.total
        self.kept += other.kept
        self.reasons.update(other.reasons)
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: MAX_EXAMPLES_PER_REASON - len(mine)])
        self.notes.extend(other.notes)

    def summary(self) -> str:
        """Multi-line human summary: totals, then one line per reason with examples."""
        head = f"{self.source or 'data'}: {self.kept} of {self.total} rows kept"
        lines = [head + (f", {self.bad} rejected" if self.bad else "")]
        for reason, count in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            shown = "; ".join(self.examples.get(reason, []))
            lines.append(f"  {reason}: {count}" + (f"  e.g. {shown}" if shown else ""))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def check(self, max_bad_fraction: float = 0.5) -> None:
        """Raise DataError when nothing usable remains or too large a share of rows is bad.

        Raises:
            DataError: no valid rows, or bad / total > max_bad_fraction.
        """
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if self.kept == 0:
            raise DataError(
                f"no valid rows in {self.source or 'the data'}; fix the rows listed below "
                f"or point at another file/dataset\n{self.summary()}"
            )
        if self.total and self.bad / self.total > max_bad_fraction:
            raise DataError(
                f"{self.bad} of {self.total} rows in {self.source or 'the data'} are invalid "
                f"({self.bad / self.total:.0%} > max_bad_fraction={max_bad_fraction:g}); "
                f"fix the data or raise max_bad_fraction\n{self.summary()}"
            )
