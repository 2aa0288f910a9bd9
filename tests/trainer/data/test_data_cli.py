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


def word_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer saved as a model folder would hold it (tokenizer.json and its config)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "Capital of France? Paris Lyon the capital is".split()
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_a_tokenizer_measures_each_field_of_the_valid_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = word_tokenizer(tmp_path / "model")
    long = {"question": "Capital of France?", "chosen": "the capital is Paris", "rejected": "Lyon"}
    path = write(tmp_path, GOOD, long, dict(GOOD, rejected="Paris"))  # the third row is bad: not measured

    assert validate_main(["--format", "preference", "--columns", "prompt=question", "--json",
                          "--tokenizer", f"file://{tokenizer}", path]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["tokenStats"] == {"promptMean": 3.0, "promptMax": 3.0, "chosenMean": 2.5, "chosenMax": 4.0,
                                    "rejectedMean": 1.0, "rejectedMax": 1.0}

    assert validate_main(["--format", "preference", "--columns", "prompt=question", "--tokenizer", str(tokenizer),
                          write(tmp_path, GOOD, long)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "tokens: promptMean 3, promptMax 3, chosenMean 2.5, chosenMax 4, rejectedMean 1, rejectedMax 1")


def test_a_tokenizer_that_cannot_be_loaded_is_named_before_the_data_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "empty").mkdir()
    assert validate_main(["--format", "preference", "--tokenizer", str(tmp_path / "empty"), str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --tokenizer {tmp_path / 'empty'}: no tokenizer could be loaded from it"), err
