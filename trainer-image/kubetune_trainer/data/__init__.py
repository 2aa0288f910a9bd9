"""Loading, formatting and validation of each dataset format.

    from kubetune_trainer.data import load_rows, validate
    report = validate("pvc://data/prefs.jsonl", "preference", columns={"prompt": "question"})
    print(report.format_text())      # "line 7: chosen equals rejected; make the rejected answer differ"
    rows = load_rows("file:///data/sft.parquet", "promptCompletion")   # DataError if a row is bad

Formats and their rows: `formats.py`. File types and line numbers: `readers.py`.
`python -m kubetune_trainer.data.cli --format F FILE` validates from a shell.
"""

from kubetune_trainer.data.formats import FORMATS
from kubetune_trainer.data.load import load_report, load_rows, validate
from kubetune_trainer.data.report import DataError, RowError, ValidationReport
from kubetune_trainer.data.stats import split_rows, token_stats

__all__ = [
    "FORMATS",
    "DataError",
    "RowError",
    "ValidationReport",
    "load_report",
    "load_rows",
    "split_rows",
    "token_stats",
    "validate",
]
