"""Validate a data set and load its rows in the canonical form of its format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_trainer.data import audio, images
from kubetune_trainer.data.formats import canonical, check_columns, decode_untyped, get_format, problems, rename
from kubetune_trainer.data.readers import Record, open_source, read_records
from kubetune_trainer.data.report import SOURCE_LINE, DataError, RowError, ValidationReport
from kubetune_trainer.storage import local_path


def load_report(
    uri: str, fmt: str, columns: Mapping[str, str] | None = None, max_errors: int | None = None,
    held_out: bool = False,
) -> tuple[list[dict[str, Any]], ValidationReport]:
    """The valid rows (canonical) and the report on all rows; reads the source once.

    Image formats also decode every image and check the set as a whole (`images.check_rows`);
    held_out: the rows are for evaluation only, so a class may have a single example. Audio
    formats decode every clip (`audio.check_rows`) and report the hours and sample rates.

    Raises ValueError for an unknown format or a columns mapping that names no field of it,
    FileNotFoundError when the uri holds nothing, ValueError when it holds no data files.
    """
    spec = get_format(fmt)
    check_columns(spec, columns)
    source = open_source(local_path(uri))
    report = ValidationReport(checksum=source.checksum)
    rows: list[dict[str, Any]] = []
    media: list[tuple[Record, dict[str, Any]]] = []  # rows whose images are checked once all are read

    def note(line: int, reason: str, file: str | None) -> None:
        if max_errors is None or len(report.errors) < max_errors:
            report.errors.append(RowError(line, f"{file}: {reason}" if file else reason))
        else:
            report.unlisted += 1

    for record in read_records(source):
        if not record.is_row:
            note(record.line, record.error or "unreadable", record.file)
            continue
        report.rows += 1
        if record.error is not None:
            found = [record.error]
        else:
            row = rename(record.value, columns)
            found = []
            if not record.typed and isinstance(row, dict):
                row, found = decode_untyped(row, spec)  # a cell that is not JSON: say only that
            found = found or problems(row, spec, columns)
        for reason in found:
            note(record.line, reason, record.file)
        if not found and fmt in images.IMAGE_FORMATS + audio.AUDIO_FORMATS:
            media.append((record, canonical(row, spec)))
        elif not found:
            report.valid_rows += 1
            rows.append(canonical(row, spec))
    if fmt in audio.AUDIO_FORMATS:
        checked, clips = audio.check_rows(source, media)
        report.stats["audio"] = clips
        report.notes.append(audio.describe(clips))
    else:
        checked = images.check_rows(source, media, fmt, training=not held_out)
    for (record, _), (row, found) in zip(media, checked):
        for reason in found:
            note(record.line, reason, record.file)
        if not found:
            report.valid_rows += 1
            rows.append(row)
    if media:
        report.errors.sort(key=lambda e: e.line)
    if report.rows == 0 and not report.errors:
        note(SOURCE_LINE, "no rows: the data set is empty", None)
    return rows, report


def validate(
    uri: str, fmt: str, columns: Mapping[str, str] | None = None, max_errors: int | None = None,
    held_out: bool = False,
) -> ValidationReport:
    """Check every row of the data at uri against format fmt; see load_report for what raises."""
    return load_report(uri, fmt, columns, max_errors, held_out)[1]


def load_rows(
    uri: str, fmt: str, columns: Mapping[str, str] | None = None, held_out: bool = False,
) -> list[dict[str, Any]]:
    """The rows in canonical form; DataError (with .report) if any row is bad."""
    rows, report = load_report(uri, fmt, columns, held_out=held_out)
    if not report.ok:
        raise DataError(report, uri)
    return rows
