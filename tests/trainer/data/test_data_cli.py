"""`kubetune validate-data FILE --format F`: the report a person reads, and the exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.data.cli import validate_main


def write(tmp_path: Path, *rows: dict[str, str]) -> str:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"question": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}


def test_valid_data_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD, GOOD)
    assert validate_main(["--format", "preference", "--columns", "prompt=question", path]) == 0
    assert capsys.readouterr().out.startswith("valid: 2 rows (sha256 ")


def test_bad_rows_are_listed_by_line_and_exit_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD, dict(GOOD, rejected="Paris"), GOOD)
    assert validate_main([path, "--format", "preference", "--columns", "prompt=question,chosen=chosen"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("invalid: 1 of 3 rows have problems")
    assert out[1:] == ["line 2: chosen equals rejected; make the rejected answer differ"]


def test_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD, {"chosen": "a", "rejected": "b"})
    assert validate_main(["--format", "preference", "--columns", "prompt=question", "--json", path]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 2 and report["validRows"] == 1 and len(report["checksum"]) == 64
    assert report["errors"] == [{"line": 2, "reason": 'missing "question" (mapped to prompt by columns); check the column name'}]


def test_unreadable_source_or_bad_arguments_exit_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_main(["--format", "text", str(tmp_path / "nothing.jsonl")]) == 2
    assert "error: no data at" in capsys.readouterr().err
    assert validate_main(["--format", "text", "--columns", "text", write(tmp_path, GOOD)]) == 2
    assert "--columns takes field=column" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        validate_main(["--format", "chat", "x.jsonl"])
    assert exit_.value.code == 2
