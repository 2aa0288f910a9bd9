"""Read the rows of a data file or folder, each with the line a person would look at.

    JSONL (.jsonl, .ndjson)   one JSON object per line; line = the line in the file
    JSON (.json)              a list of objects, or {"data": [...]}; line = row index + 1
                              (a .json file that holds JSON lines is read as JSONL)
    CSV (.csv, .tsv)          a header row, then one row per record; line = the line the
                              record starts on, the header being line 1
    Parquet (.parquet, .pq)   line = row index + 1
    datasets folder           what `Dataset.save_to_disk` (or `DatasetDict`'s, for its
                              train split) wrote; line = row index + 1
    ImageFolder               class folders of image files, no data files (images.py);
                              line = the image's place in name order

JSONL, JSON and CSV may be gzip-compressed (.gz). A folder of files of one of these kinds is
read file after file, in name order; the file name is then given with each problem.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.data.report import SOURCE_LINE

KINDS_BY_SUFFIX = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
}
DATA_SUFFIXES = ", ".join(KINDS_BY_SUFFIX)


@dataclass
class Record:
    """A row as read (`value`), or why it could not be read (`error`). `typed` is False when
    the source has no types (CSV), so the format may decode "true" or a JSON list; `is_row` is
    False for a problem of the whole file (no row was read)."""

    line: int
    value: Any = None
    error: str | None = None
    typed: bool = True
    is_row: bool = True
    file: str | None = None


@dataclass
class Source:
    path: Path
    kind: str
    files: list[Path]

    @property
    def checksum(self) -> str:
        """sha256 of the source bytes: of the file, or over each file's relative path and bytes."""
        h = hashlib.sha256()
        if self.path.is_file():
            _hash_file(h, self.path)
        else:
            for f in sorted(p for p in self.path.rglob("*") if p.is_file() and not _hidden(p, self.path)):
                h.update(f.relative_to(self.path).as_posix().encode() + b"\0")
                _hash_file(h, f)
        return h.hexdigest()


def _hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith((".", "_")) for part in p.relative_to(root).parts)


def kind_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None
    return KINDS_BY_SUFFIX.get(suffixes[-1]) if suffixes else None


def open_source(path: Path) -> Source:
    """Find out what kind of data a path holds; ValueError or FileNotFoundError if it is none."""
    if not path.exists():
        raise FileNotFoundError(f"no data at {path}; check the uri")
    if path.is_file():
        kind = kind_of(path)
        if kind is None:
            raise ValueError(f"{path.name}: unknown data file type; use one of {DATA_SUFFIXES} (or a datasets folder)")
        return Source(path, kind, [path])
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return Source(path, "datasets", [])
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path) and kind_of(p))
    kinds = sorted({kind_of(p) or "" for p in files})
    if not files:
        from kubetune_trainer.data import images

        if images.is_image_folder(path):
            return Source(path, images.IMAGE_FOLDER, [])
        raise ValueError(f"folder {path} holds no data files; expected {DATA_SUFFIXES} files, a datasets folder "
                         "or class folders of images (ImageFolder)")
    if len(kinds) > 1:
        raise ValueError(f"folder {path} mixes {' and '.join(kinds)} files; keep one kind of file per folder")
    return Source(path, kinds[0], files)


def read_records(source: Source) -> Iterator[Record]:
    if source.kind == "datasets":
        yield from _read_datasets(source.path)
        return
    if source.kind == "imagefolder":
        from kubetune_trainer.data.images import read_image_folder

        yield from read_image_folder(source.path)
        return
    several = len(source.files) > 1
    for f in source.files:
        label = f.relative_to(source.path).as_posix() if several else None
        for record in _read_file(f, source.kind):
            record.file = label
            yield record


def _read_file(path: Path, kind: str) -> Iterator[Record]:
    if kind == "parquet":
        yield from _read_parquet(path)
        return
    raw = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
    if kind == "jsonl":
        yield from _read_jsonl(raw)
    elif kind == "json":
        yield from _read_json(raw)
    else:
        yield from _read_csv(raw, "\t" if kind == "tsv" else ",")


def _json_error(e: json.JSONDecodeError) -> str:
    return f"{e.msg} at column {e.colno}"


def _read_jsonl(raw: bytes) -> Iterator[Record]:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Record(number, error=f"not UTF-8 text (byte {e.start + 1}); save the file as UTF-8")
            continue
        try:
            yield Record(number, json.loads(text))
        except json.JSONDecodeError as e:
            yield Record(number, error=f"not valid JSON ({_json_error(e)}); write one JSON object per line")


def _read_json(raw: bytes) -> Iterator[Record]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield Record(SOURCE_LINE, error=f"not UTF-8 text (byte {e.start + 1}); save the file as UTF-8", is_row=False)
        return
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().split("\n", 1)[0]
        if e.msg == "Extra data" and _is_json_object(first):
            yield from _read_jsonl(raw)  # JSON lines in a .json file
            return
        yield Record(e.lineno, error=f"file is not valid JSON ({_json_error(e)} of line {e.lineno}); "
                                     "fix the syntax there", is_row=False)
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        keys = f" with keys {', '.join(map(str, list(data)[:5]))}" if isinstance(data, dict) else ""
        yield Record(SOURCE_LINE, error=f'top level is {json_type(data)}{keys}; write a list of rows, '
                                        'or {"data": [rows]}', is_row=False)
        return
    for i, row in enumerate(data):
        yield Record(i + 1, row)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_csv(raw: bytes, delimiter: str) -> Iterator[Record]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield Record(SOURCE_LINE, error=f"not UTF-8 text (byte {e.start + 1}); save the file as UTF-8", is_row=False)
        return
    csv.field_size_limit(2**31 - 1)  # long texts in one cell are normal for pretraining data
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        yield Record(1, error=f"the header row is not valid CSV ({e})", is_row=False)
        return
    end = reader.line_num
    while True:
        start = end + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Record(start, error=f"not valid CSV ({e}); check the quotes", typed=False)
            return
        end = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield Record(start, error=f"has {len(values)} fields but the header has {len(header)}; "
                                      "quote fields that hold the delimiter", typed=False)
            continue
        yield Record(start, dict(zip(header, values)), typed=False)


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several kinds for a damaged file
        yield Record(SOURCE_LINE, error=f"{path.name} is not a readable Parquet file ({e})", is_row=False)
        return
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            index += 1
            yield Record(index, row)


def _read_datasets(path: Path) -> Iterator[Record]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several kinds for a folder it cannot read
        yield Record(SOURCE_LINE, error=f"not a readable datasets folder ({e})", is_row=False)
        return
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if "train" in data:
            data = data["train"]
        elif len(splits) == 1:
            data = data[splits[0]]
        else:
            yield Record(SOURCE_LINE, error=f"the folder holds the splits {', '.join(splits)} and none is train; "
                                            "point the uri at one split's folder", is_row=False)
            return
    index = 0
    for batch in data.with_format("arrow").iter(batch_size=4096):  # raw values: images stay bytes
        for row in batch.to_pylist():
            index += 1
            yield Record(index, row)


def json_type(value: Any) -> str:
    """The JSON name of a value's type, as a person who wrote the data would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
