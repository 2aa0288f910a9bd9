"""What validating a data set found: counts, a checksum, and every bad row with its line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# RowError.line 0 means the source as a whole (an empty file, a file that cannot be parsed).
SOURCE_LINE = 0


@dataclass(frozen=True)
class RowError:
    """One problem with one row: its 1-based line (JSONL, CSV) or row number (JSON, Parquet,
    datasets folder), and what to fix."""

    line: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason}

    def format_text(self) -> str:
        where = "source" if self.line == SOURCE_LINE else f"line {self.line}"
        return f"{where}: {self.reason}"


@dataclass
class ValidationReport:
    """rows: rows read; valid_rows: rows with no problem; errors: the problems found, by line
    (at most max_errors of them); checksum: sha256 of the source bytes, hex; unlisted: the
    problems left out of errors by max_errors."""

    rows: int = 0
    valid_rows: int = 0
    errors: list[RowError] = field(default_factory=list)
    checksum: str = ""
    unlisted: int = 0
    # what the valid rows hold as a whole, by kind (e.g. "audio": hours, clips, sample rates),
    # and a line for a person about each
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.rows > 0 and self.valid_rows == self.rows

    @property
    def bad_rows(self) -> int:
        return self.rows - self.valid_rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "validRows": self.valid_rows,
            "errors": [e.to_dict() for e in self.errors],
            "checksum": self.checksum,
            **({"stats": self.stats} if self.stats else {}),
        }

    def summary(self) -> str:
        if self.ok:
            return f"valid: {self.rows} rows (sha256 {self.checksum})"
        if self.rows == 0:
            return "invalid: no rows read"
        return f"invalid: {self.bad_rows} of {self.rows} rows have problems (sha256 {self.checksum})"

    def format_text(self) -> str:
        """The summary, then one line per problem: "line 7: chosen equals rejected; ..."."""
        lines = [self.summary(), *self.notes] + [e.format_text() for e in self.errors]
        if self.unlisted:
            lines.append(f"... and {self.unlisted} more problems")
        return "\n".join(lines)


class DataError(ValueError):
    """Raised by load_rows when a data set has bad rows; `.report` holds all that was found."""

    def __init__(self, report: ValidationReport, source: str = "", first: int = 10):
        self.report = report
        listed = "\n".join("  " + e.format_text() for e in report.errors[:first])
        left = len(report.errors) - first + report.unlisted
        more = f"\n  ... and {left} more problems" if left > 0 else ""
        what = f"{report.bad_rows} of {report.rows} rows have problems" if report.bad_rows else "it cannot be read"
        where = f" {source}" if source else ""
        super().__init__(
            f"data set{where} is not valid ({what}):\n{listed}{more}\n"
            "Fix them, or list them all with `kubetune validate-data FILE --format FORMAT`."
        )
