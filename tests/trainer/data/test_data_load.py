"""Every file type and uri loads into the same canonical rows, with lines a person can find."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune_trainer.data import load_rows, split_rows, token_stats, validate

ROWS = [
    {"prompt": "Capital of France?", "completion": "Paris", "label": True},
    {"prompt": "Capital of Spain?", "completion": "Lisbon", "label": False},
    {"prompt": "2+2=", "completion": "4", "label": True},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: (json.dumps(v) if not isinstance(v, str) else v) for k, v in r.items()} for r in rows])
    return path


def write_datasets(path: Path, rows: list[dict[str, Any]], split: str | None = None) -> Path:
    import datasets

    data = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({split: data}) if split else data).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json-list", "json-data", "json-lines", "parquet", "csv", "tsv",
                                  "jsonl.gz", "datasets", "datasets-dict", "folder"])
def test_each_file_type_loads_the_same_rows(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "data"
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif kind == "json-list":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS, indent=2))
    elif kind == "json-data":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"data": ROWS}))
    elif kind == "json-lines":  # JSON lines saved as .json, as many hub data sets are
        path = write_jsonl(tmp_path / "d.json", ROWS)
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif kind == "csv":
        path = write_csv(tmp_path / "d.csv", ROWS)
    elif kind == "tsv":
        path = tmp_path / "d.tsv"
        path.write_text("prompt\tcompletion\tlabel\n" + "".join(f"{r['prompt']}\t{r['completion']}\t{r['label']}\n" for r in ROWS))
    elif kind == "jsonl.gz":
        path = tmp_path / "d.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    elif kind == "datasets":
        write_datasets(path, ROWS)
    elif kind == "datasets-dict":
        write_datasets(path, ROWS, split="train")
    else:
        path.mkdir()
        write_jsonl(path / "part-000.jsonl", ROWS[:2])
        write_jsonl(path / "part-001.jsonl", ROWS[2:])
        (path / "README.md").write_text("# not data")
        (path / ".cache").mkdir()
        (path / ".cache" / "x.jsonl").write_text("not json\n")
    assert load_rows(str(path), "unpairedPreference") == ROWS
    report = validate(str(path), "unpairedPreference")
    assert (report.rows, report.valid_rows, len(report.checksum)) == (3, 3, 64)


def test_line_numbers_follow_each_file_type(tmp_path: Path) -> None:
    bad = {"prompt": "Capital of Italy?", "completion": "Rome", "label": "yes"}
    rows = [ROWS[0], bad, ROWS[1], bad]
    json_file = tmp_path / "d.json"
    json_file.write_text(json.dumps(rows, indent=2))  # a row spans several lines: rows are counted
    pq.write_table(pa.Table.from_pylist([{**r, "label": str(r["label"])} for r in rows]), tmp_path / "d.parquet")
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('prompt,completion,label\n"Capital\nof France?",Paris,true\nQ,A,yes\n\nQ,A,false\nQ,A,maybe\n')
    for path, lines in ((json_file, [2, 4]), (csv_file, [4, 7])):
        assert [e.line for e in validate(str(path), "unpairedPreference").errors] == lines, path
    parquet = validate(str(tmp_path / "d.parquet"), "unpairedPreference")
    assert [e.line for e in parquet.errors] == [1, 2, 3, 4]  # "True" is a string in this file
    assert parquet.errors[0].reason == '"label" must be true or false (is the completion desirable?), got "True"'
    typed = [ROWS[0], dict(bad, label=False, completion=""), ROWS[1], dict(bad, label=True, prompt="")]
    datasets_dir = write_datasets(tmp_path / "ds", typed)
    assert [e.line for e in validate(str(datasets_dir), "unpairedPreference").errors] == [2, 4]


def test_csv_rows_with_the_wrong_number_of_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text\nfine\n\"two, fields\"\nthree,fields\n")
    report = validate(str(path), "text")
    assert [(e.line, e.reason) for e in report.errors] == [
        (4, "has 2 fields but the header has 1; quote fields that hold the delimiter"),
    ]


def test_csv_cells_holding_json_lists_are_decoded(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_csv(tmp_path / "d.csv", [{"messages": messages}, {"messages": "[{\"role\": \"user\""}])
    report = validate(str(path), "messages")
    assert [(e.line, e.reason) for e in report.errors] == [
        (3, '"messages" is not valid JSON (Expecting \',\' delimiter at column 17); write it as a JSON list'),
    ]


def test_a_whole_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    report = validate(str(path), "text")
    assert report.rows == 0 and not report.ok
    assert report.errors[0].line == 4 and report.errors[0].reason.startswith("file is not valid JSON (")
    path.write_text('{"rows": [{"text": "a"}]}')
    (error,) = validate(str(path), "text").errors
    assert error.reason == 'top level is an object with keys rows; write a list of rows, or {"data": [rows]}'


def test_parquet_nulls_of_nested_messages_are_dropped(tmp_path: Path) -> None:
    rows = [{"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "snow", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Snow."},
    ]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")  # struct columns fill absent keys with null
    (row,) = load_rows(str(tmp_path / "m.parquet"), "messages")
    assert row["messages"][0] == {"role": "user", "content": "Weather?"}
    assert row["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert row["messages"][2] == {"role": "tool", "content": "snow", "tool_call_id": "c1"}


def test_uris_file_pvc_and_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    claim = tmp_path / "pvcs" / "datasets" / "prefs"
    claim.mkdir(parents=True)
    write_jsonl(claim / "train.jsonl", ROWS)
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvcs"))
    monkeypatch.setenv("KUBETUNE_BASE_DIR", str(tmp_path / "pvcs" / "datasets"))
    for uri in ("pvc://datasets/prefs/train.jsonl", "pvc://datasets/prefs", f"file://{claim}/train.jsonl",
                "file://prefs/train.jsonl", str(claim / "train.jsonl")):
        assert load_rows(uri, "unpairedPreference") == ROWS, uri


def test_folder_file_names_are_given_with_problems(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}, {"text": ""}])
    (error,) = validate(str(tmp_path), "text").errors
    assert (error.line, error.reason) == (2, 'b.jsonl: "text" is empty; write the text or drop the row')


def test_sources_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no data at"):
        validate(str(tmp_path / "missing.jsonl"), "text")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown data file type; use one of .jsonl"):
        validate(str(tmp_path / "d.txt"), "text")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", [{"text": "x"}])
    write_csv(mixed / "b.csv", [{"text": "x"}])
    with pytest.raises(ValueError, match="mixes csv and jsonl files; keep one kind of file per folder"):
        validate(str(mixed), "text")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    report = validate(str(tmp_path / "broken.parquet"), "text")
    assert not report.ok and report.errors[0].reason.startswith("broken.parquet is not a readable Parquet file")


def test_columns_map_source_columns_to_format_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "2+2=", "good": "4", "bad": "5", "prompt": "ignored", "id": 1},
        {"question": "3+3=", "good": "6"},
    ])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    report = validate(str(path), "preference", columns=columns)
    assert [(e.line, e.reason) for e in report.errors] == [
        (2, 'missing "bad" (mapped to rejected by columns); check the column name'),
    ]
    with pytest.raises(ValueError, match="line 2"):
        load_rows(str(path), "preference", columns=columns)
    write_jsonl(path, [{"question": "2+2=", "good": "4", "bad": "5", "prompt": "ignored", "id": 1}])
    assert load_rows(str(path), "preference", columns=columns) == [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}]


def test_split_rows_is_deterministic_and_disjoint() -> None:
    rows = [{"text": str(i)} for i in range(100)]
    train, held = split_rows(rows, 0.1, seed=42)
    assert (len(train), len(held)) == (90, 10)
    assert sorted(r["text"] for r in train + held) == sorted(r["text"] for r in rows)
    assert train == [r for r in rows if r not in held]  # the rows' order is kept
    assert split_rows(rows, 0.1, seed=42) == (train, held)
    assert split_rows(rows, 0.1, seed=7)[1] != held
    assert split_rows(rows, 0.0, seed=1) == (rows, [])
    assert len(split_rows(rows[:3], 0.01, seed=1)[1]) == 1
    with pytest.raises(ValueError, match="fraction"):
        split_rows(rows, 1.0, seed=1)


def test_token_stats_counts_tokens_of_each_field() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "a b c d ok yes no hi there weather sunny".split()
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rows = [
        {"prompt": "a b c", "chosen": "yes", "rejected": "no no"},
        {"prompt": "a", "chosen": "ok ok ok ok", "rejected": "no"},
    ]
    expected = {"promptMean": 2.0, "promptMax": 3.0, "chosenMean": 2.5, "chosenMax": 4.0,
                "rejectedMean": 1.5, "rejectedMax": 2.0}
    assert token_stats(rows, "preference", raw) == expected
    assert token_stats(rows, "preference", PreTrainedTokenizerFast(tokenizer_object=raw)) == expected
    chat = [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "sunny"}]}]
    assert token_stats(chat, "messages", raw) == {"messagesMean": 3.0, "messagesMax": 3.0}
