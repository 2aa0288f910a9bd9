"""python -m kubetune_trainer.data.cli --format preference [--columns prompt=question] [--tokenizer URI] [--json] FILE_OR_URI

Validate a data set and print what is wrong with it, line by line. Exit status: 0 when every
row is valid, 1 when some are not, 2 when the data or the tokenizer cannot be read or the
arguments are wrong. With --tokenizer, the report also gives the mean and max length in tokens
of each text field of the valid rows (tokenStats: what maxLength a stage needs).
`kubetune validate-data` and `kubetune-train validate` call validate_main.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kubetune_trainer.data.formats import FORMATS, get_format
from kubetune_trainer.data.load import load_report
from kubetune_trainer.data.stats import token_stats


def _columns(items: Sequence[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            field, sep, column = pair.partition("=")
            if not sep or not field.strip() or not column.strip():
                raise argparse.ArgumentTypeError(f"--columns takes field=column, got {pair!r}")
            out[field.strip()] = column.strip()
    return out


def parser(prog: str = "kubetune validate-data") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Check every row of a data set and list the bad ones by line.")
    p.add_argument("source", metavar="FILE_OR_URI", help="A file or folder, or a file://, pvc://, s3:// or hf:// uri.")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="The dataset format the rows should have.")
    p.add_argument("--columns", action="append", metavar="FIELD=COLUMN",
                   help="Read a format field from another column, e.g. prompt=question (repeat, or separate with commas).")
    p.add_argument("--max-errors", type=int, default=None, metavar="N", help="List at most N problems (default: all).")
    p.add_argument("--tokenizer", metavar="URI",
                   help="Also measure each text field in tokens (tokenStats) with the tokenizer of this model or "
                        "tokenizer folder (a path, file://, pvc://, s3:// or hf:// uri).")
    p.add_argument("--json", action="store_true",
                   help="Print the report as JSON (rows, validRows, errors, checksum, tokenStats).")
    return p


def load_tokenizer(uri: str) -> object:
    """The tokenizer of a model or tokenizer folder; ValueError naming the uri when there is none."""
    from transformers import AutoTokenizer

    from kubetune_trainer.storage import local_path

    try:
        return AutoTokenizer.from_pretrained(str(local_path(uri)))
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {uri}: no tokenizer could be loaded from it ({str(e).splitlines()[0]})") from None


def validate_main(argv: Sequence[str] | None = None, prog: str = "kubetune validate-data") -> int:
    p = parser(prog)
    args = p.parse_args(argv)
    try:
        columns = _columns(args.columns)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer and get_format(args.format).text_fields else None
        rows, report = load_report(args.source, args.format, columns=columns, max_errors=args.max_errors)
    except (argparse.ArgumentTypeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = report.to_dict()
    if tokenizer is not None:
        out["tokenStats"] = token_stats(rows, args.format, tokenizer)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(report.format_text())
        if out.get("tokenStats"):
            print("tokens: " + ", ".join(f"{k} {v:g}" for k, v in out["tokenStats"].items()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(validate_main(prog="python -m kubetune_trainer.data.cli"))
