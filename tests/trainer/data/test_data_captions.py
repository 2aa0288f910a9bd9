"""imageCaption data: every file type loads the same images and captions, an optional label is kept;
each bad image, caption or label is reported with its line; the generated captioned shapes are valid,
labelled, new draws in the held-out split and the same for a seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune_trainer.data import DataError, load_rows, validate
from kubetune_trainer.data.cli import validate_main
from kubetune_trainer.data.images import open_image
from trainer_helpers import jsonl, png, png_bytes


def test_every_bad_image_caption_and_label_is_caught_on_its_line(tmp_path: Path) -> None:
    png(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows: list[Any] = [
        {"image": "imgs/a.png", "caption": "a red square"},                  # 1 good
        {"image": "imgs/missing.png", "caption": "a red square"},             # 2 image file missing
        {"image": "imgs/broken.png", "caption": "a red square"},              # 3 not decodable
        {"image": "imgs/a.png"},                                              # 4 caption missing
        {"image": "imgs/a.png", "caption": "  "},                             # 5 caption empty
        {"caption": "a red square"},                                          # 6 image missing
        {"image": "imgs/a.png", "caption": "a red square", "label": ""},      # 7 label empty
        {"image": "imgs/a.png", "caption": "a red square", "label": "square"},  # 8 good, labelled
    ]
    report = validate(jsonl(tmp_path / "d.jsonl", rows), "imageCaption")
    found = {e.line: e.reason for e in report.errors}
    assert (report.rows, report.valid_rows) == (8, 2)
    assert sorted(found) == [2, 3, 4, 5, 6, 7]
    assert found[2].startswith("image file imgs/missing.png does not exist")
    assert found[3].startswith("image file imgs/broken.png cannot be decoded")
    assert found[4].startswith('missing "caption"')
    assert found[5].startswith('"caption" is empty')
    assert found[6].startswith('missing "image"')
    assert found[7] == '"label" is empty; give the class name'


def test_a_bad_set_raises_data_error_with_the_lines(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    uri = jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "caption": "x"}, {"image": "gone.png", "caption": "y"}])
    with pytest.raises(DataError, match="line 2: image file gone.png does not exist"):
        load_rows(uri, "imageCaption")


def test_csv_parquet_and_datasets_folders_carry_paths_or_bytes_and_labels(tmp_path: Path) -> None:
    red, blue = (250, 0, 0), (0, 0, 250)
    png(tmp_path / "sub" / "red.png", red)
    png(tmp_path / "sub" / "blue.png", blue)
    captions, labels = ["a red square", "a blue square"], ["red", "blue"]
    (tmp_path / "sub" / "rows.csv").write_text("image,caption,label\nred.png,a red square,red\n"
                                               "blue.png,a blue square,blue\n")
    pq.write_table(pa.table({"image": [png_bytes(red), png_bytes(blue)], "caption": captions, "label": labels}),
                   tmp_path / "binary.parquet")
    struct = [{"bytes": png_bytes(red), "path": None}, {"bytes": None, "path": "sub/blue.png"}]
    pq.write_table(pa.table({"image": struct, "caption": captions}), tmp_path / "struct.parquet")
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"image": [str(tmp_path / "sub" / "red.png"), str(tmp_path / "sub" / "blue.png")],
                                       "caption": captions, "label": labels}, features=features)
    data.save_to_disk(str(tmp_path / "hf"))
    for uri in ("sub/rows.csv", "binary.parquet", "struct.parquet", "hf"):
        rows = load_rows(str(tmp_path / uri), "imageCaption")
        assert [open_image(r["image"]).getpixel((2, 2)) for r in rows] == [red, blue], uri
        assert [r["caption"] for r in rows] == captions, uri
        assert [r.get("label") for r in rows] == (labels if uri != "struct.parquet" else [None, None]), uri


def test_validate_data_command_lists_caption_problems_by_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png(tmp_path / "a.png")
    uri = jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "caption": "a cat"}, {"image": "a.png", "caption": ""}])
    assert validate_main([uri, "--format", "imageCaption"]) == 1
    out = capsys.readouterr().out
    assert "invalid: 1 of 2 rows have problems" in out and 'line 2: "caption" is empty' in out
    jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "caption": "a cat"}])
    assert validate_main([uri, "--format", "imageCaption"]) == 0


def test_generated_shapes_are_valid_labelled_new_draws_and_the_same_for_a_seed(tmp_path: Path) -> None:
    from kubetune_trainer.data.synthetic_images import SHAPES, make_shapes, shape_caption

    paths = make_shapes(tmp_path / "a", seed=3, size=32, n_train=300, n_val=60)
    train = load_rows(str(paths["shapes/train.jsonl"]), "imageCaption")
    held_out = load_rows(str(paths["shapes/validation.jsonl"]), "imageCaption", held_out=True)
    assert (len(train), len(held_out)) == (300, 60)
    assert {r["label"] for r in train} == set(SHAPES) and {r["label"] for r in held_out} <= set(SHAPES)
    assert all(r["label"] in r["caption"] for r in train + held_out)
    # held-out captions name colour, shape and position, in one phrasing; training ones vary
    assert all(r["caption"].startswith(("a ", "an ")) and " the " in r["caption"] for r in held_out)
    assert any(r["caption"].startswith("a photo of") for r in train)
    assert shape_caption("orange", "circle", "top") == "an orange circle at the top"
    assert shape_caption(None, "cross", "left", photo=True) == "a photo of a cross on the left"
    # every image is its own draw: no held-out image repeats a training one
    pixels = {open_image(r["image"]).tobytes() for r in train}
    assert len(pixels) == len(train) and not pixels & {open_image(r["image"]).tobytes() for r in held_out}
    assert open_image(train[0]["image"]).size == (32, 32)
    again = make_shapes(tmp_path / "b", seed=3, size=32, n_train=300, n_val=60)
    assert again["shapes/train.jsonl"].read_bytes() == paths["shapes/train.jsonl"].read_bytes()
    assert (again["shapes/validation"] / "00007.png").read_bytes() == (paths["shapes/validation"] / "00007.png").read_bytes()
