"""imageLabel data: every file type and the ImageFolder layout load the same images; each bad image
or label is reported with its line (and the file it names); the generated digits are valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune_trainer.data import DataError, load_rows, validate
from kubetune_trainer.data.cli import validate_main
from kubetune_trainer.data.images import class_names, open_image
from trainer_helpers import jsonl, png, png_bytes


def errors(uri: str, held_out: bool = False) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in validate(uri, "imageLabel", held_out=held_out).errors:
        out.setdefault(e.line, []).append(e.reason)
    return out


def test_image_folder_rows_are_labelled_by_their_class_folder(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        for i in range(2):
            png(tmp_path / "train" / cls / f"{i}.png")
    (tmp_path / "train" / "README.txt").write_text("not an image, not a row")
    rows = load_rows(str(tmp_path / "train"), "imageLabel")
    assert [(Path(r["image"]).relative_to(tmp_path / "train").as_posix(), r["label"]) for r in rows] == [
        ("cat/0.png", "cat"), ("cat/1.png", "cat"), ("dog/0.png", "dog"), ("dog/1.png", "dog")]
    assert open_image(rows[0]["image"]).size == (6, 6)


def test_image_folder_problems_name_the_file(tmp_path: Path) -> None:
    for i in range(2):
        png(tmp_path / "cat" / f"{i}.png")
    (tmp_path / "cat" / "2.png").write_bytes(b"not a png")
    png(tmp_path / "dog" / "0.png")
    png(tmp_path / "stray.png")
    report = validate(str(tmp_path), "imageLabel")
    assert (report.rows, report.valid_rows) == (5, 2)
    found = {e.line: e.reason for e in report.errors}
    assert sorted(found) == [3, 4, 5]
    assert found[3].startswith("cat/2.png: image file cat/2.png cannot be decoded")
    assert found[4] == ('dog/0.png: class "dog" has only this example; a class needs at least 2 training examples: '
                        "add more or drop the row")
    assert found[5].startswith("stray.png: image is not in a class folder")


def test_every_bad_image_and_label_is_caught_on_its_line(tmp_path: Path) -> None:
    png(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows: list[Any] = [
        {"image": "imgs/a.png", "label": "cat"},          # 1 good
        {"image": "imgs/missing.png", "label": "cat"},    # 2 image file missing
        {"image": "imgs/broken.png", "label": "cat"},     # 3 not decodable
        {"image": "imgs/a.png"},                          # 4 label missing
        {"image": "imgs/a.png", "label": " "},            # 5 label empty
        {"label": "cat"},                                 # 6 image missing
        {"image": "imgs/a.png", "label": "cat"},          # 7 good
        {"image": "imgs/a.png", "label": "lonely"},       # 8 a class with one example
        {"image": "imgs/a.png", "label": 4},              # 9, 10: integers among class names
        {"image": "imgs/a.png", "label": 4},
        {"image": "imgs/a.png", "label": "cat"},          # 11 good
    ]
    found = errors(jsonl(tmp_path / "data.jsonl", rows))
    assert sorted(found) == [2, 3, 4, 5, 6, 8, 9, 10]
    assert found[2] == ["image file imgs/missing.png does not exist; image paths are relative to the data file's folder"]
    assert len(found[3]) == 1 and found[3][0].startswith("image file imgs/broken.png cannot be decoded (")
    assert found[4] == ['missing "label"; add it, or map your column to it with columns: {label: yourColumn}']
    assert found[5] == ['"label" is empty; give the class name']
    assert found[6] == ['missing "image"; add it, or map your column to it with columns: {image: yourColumn}']
    assert found[8] == ['class "lonely" has only this example; a class needs at least 2 training examples: '
                        "add more or drop the row"]
    assert found[9] == found[10] == ['"label" 4 is an integer, but 6 other labels are class names; give every label '
                                     "as a class name or every one as an integer"]


def test_held_out_rows_may_have_a_class_of_one(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    uri = jsonl(tmp_path / "val.jsonl", [{"image": "a.png", "label": 1}, {"image": "a.png", "label": 2}])
    assert sorted(errors(uri)) == [1, 2]
    assert errors(uri, held_out=True) == {}


def test_a_bad_set_raises_data_error_with_the_lines(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    uri = jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "label": 0}, {"image": "gone.png", "label": 0},
                                       {"image": "a.png", "label": 0}])
    with pytest.raises(DataError, match="line 2: image file gone.png does not exist"):
        load_rows(uri, "imageLabel")


def test_csv_parquet_and_datasets_folders_carry_paths_or_bytes(tmp_path: Path) -> None:
    red, blue = (250, 0, 0), (0, 0, 250)
    png(tmp_path / "sub" / "red.png", red)
    png(tmp_path / "sub" / "blue.png", blue)
    (tmp_path / "sub" / "rows.csv").write_text("image,label\nred.png,red\nblue.png,blue\nred.png,red\nblue.png,blue\n")
    pq.write_table(pa.table({"image": [png_bytes(red), png_bytes(blue)] * 2, "label": ["red", "blue"] * 2}),
                   tmp_path / "binary.parquet")
    struct = [{"bytes": png_bytes(red), "path": None}, {"bytes": None, "path": "sub/blue.png"}] * 2
    pq.write_table(pa.table({"image": struct, "label": ["red", "blue"] * 2}), tmp_path / "struct.parquet")
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"image": [str(tmp_path / "sub" / "red.png"), str(tmp_path / "sub" / "blue.png")] * 2,
                                       "label": ["red", "blue"] * 2}, features=features)
    data.save_to_disk(str(tmp_path / "hf"))
    for uri in ("sub/rows.csv", "binary.parquet", "struct.parquet", "hf"):
        rows = load_rows(str(tmp_path / uri), "imageLabel")
        colours = [open_image(r["image"]).getpixel((2, 2)) for r in rows]
        assert colours == [red, blue] * 2, uri
        assert [r["label"] for r in rows] == ["red", "blue"] * 2, uri


def test_validate_data_command_lists_image_problems_by_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png(tmp_path / "a.png")
    (tmp_path / "b.png").write_text("text")
    uri = jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "label": 1}, {"image": "b.png", "label": 1},
                                       {"image": "a.png", "label": 1}])
    assert validate_main([uri, "--format", "imageLabel"]) == 1
    out = capsys.readouterr().out
    assert "invalid: 1 of 3 rows have problems" in out and "line 2: image file b.png cannot be decoded" in out
    png(tmp_path / "b.png")
    assert validate_main([uri, "--format", "imageLabel"]) == 0


def test_generated_digits_are_valid_stratified_and_the_same_for_a_seed(tmp_path: Path) -> None:
    from kubetune_trainer.data.synthetic_images import make_digits

    paths = make_digits(tmp_path / "a", seed=3, size=16)
    train = load_rows(str(paths["digits/train"]), "imageLabel")
    held_out = load_rows(str(paths["digits/validation.jsonl"]), "imageLabel", held_out=True)
    assert (len(train), len(held_out)) == (1438, 359)
    assert sorted({r["label"] for r in train}) == [str(d) for d in range(10)]  # folder names
    assert {r["label"] for r in held_out} == set(range(10))  # JSONL: integers
    assert min(sum(r["label"] == d for r in held_out) for d in range(10)) >= 35
    assert not {Path(r["image"]).name for r in train} & {Path(r["image"]).name for r in held_out}
    assert open_image(train[0]["image"]).size == (16, 16)
    again = make_digits(tmp_path / "b", seed=3, size=16)
    assert again["digits/train.jsonl"].read_bytes() == paths["digits/train.jsonl"].read_bytes()
    assert (again["digits/train"] / "0" / "0000.png").read_bytes() == (paths["digits/train"] / "0" / "0000.png").read_bytes()


def test_class_names_are_one_per_class_in_numeric_then_alphabetic_order() -> None:
    assert class_names([3, "3", "10", 2, "cat", "ant"]) == ["2", "3", "10", "ant", "cat"]
