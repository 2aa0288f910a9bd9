"""Image rows: the ImageFolder layout, decoding every image, and what an imageLabel set must hold as a whole.

    kubetune validate-data examples/data/digits/train --format imageLabel

Where the images of an `imageLabel` (or `imageCaption`) data set come from:

    ImageFolder          a folder of class folders, one image file per row: train/cat/001.png gives
                         {"image": "cat/001.png", "label": "cat"}; line = the image's place in name
                         order, and its path is given with each problem
    a path               {"image": "imgs/1.png"}, relative to the folder of the data file (JSONL,
                         JSON, CSV, Parquet) or absolute
    bytes                {"image": {"bytes": b"...", "path": ...}} as the `datasets` Image feature
                         stores them (Parquet, datasets folders), or a binary column

Each image is decoded once while validating, so a file that is missing or not an image is found
before training starts, with its line and its name. An `imageLabel` training set is also checked
as a whole: labels are all integers or all class names, and every class has at least 2 examples.
The rows that come out name their images by absolute path (or keep their bytes), so recipes open
them with `open_image` wherever the data came from.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kubetune_trainer.data.readers import Record, Source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_FORMATS = ("imageLabel", "imageCaption")
MIN_EXAMPLES_PER_CLASS = 2
IMAGE_FOLDER = "imagefolder"  # the Source kind of the ImageFolder layout


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_image_folder(path: Path) -> bool:
    """A folder whose class folders hold image files (and no data files: those come first)."""
    return path.is_dir() and any(
        p.is_file() and is_image(p) and _visible(p, path) and p.parent != path for p in path.rglob("*")
    )


def read_image_folder(root: Path) -> Iterator[Record]:
    """One row per image file, labelled by its class folder (the folder right under root)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image(p) and _visible(p, root))
    for line, p in enumerate(files, start=1):
        rel = p.relative_to(root).as_posix()
        if p.parent == root:
            yield Record(line, error="image is not in a class folder; put it under <class>/ (the folder names the "
                                     "label)", file=rel)
            continue
        yield Record(line, {"image": rel, "label": p.relative_to(root).parts[0]}, file=rel)


# --- decoding -------------------------------------------------------------------------------


def base_folder(source: Source, file: str | None) -> Path:
    """The folder an image path of a row is relative to: the data file's own folder."""
    if source.kind == IMAGE_FOLDER or source.kind == "datasets":
        return source.path
    if source.path.is_file():
        return source.path.parent
    if file is not None:
        return (source.path / file).parent
    return source.files[0].parent if source.files else source.path


def resolve(value: Any, base: Path) -> Any:
    """The image value with its path made absolute (bytes are kept as they are)."""
    if isinstance(value, str):
        return str(base / value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return {"bytes": value["bytes"]}
        return str(base / value["path"])
    return value  # bytes


def _shown(value: Any, base: Path) -> str:
    if isinstance(value, str):
        p = Path(value)
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            return value
    data: Any = value.get("bytes") if isinstance(value, dict) else value
    return f"of {len(data)} bytes"


def open_image(value: Any) -> Any:
    """A resolved image value (see `resolve`) as an RGB PIL image."""
    from PIL import Image

    if isinstance(value, str):
        with Image.open(value) as im:
            return im.convert("RGB")
    data: Any = value.get("bytes") if isinstance(value, dict) else value
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def decode_problem(value: Any, base: Path) -> str | None:
    """What keeps a resolved image from being read, naming the file; None when it decodes."""
    from PIL import Image, UnidentifiedImageError

    shown = _shown(value, base)
    if isinstance(value, str) and not Path(value).is_file():
        return f"image file {shown} does not exist; image paths are relative to the data file's folder"
    try:
        if isinstance(value, str):
            with Image.open(value) as im:
                im.load()
        else:
            data: Any = value.get("bytes") if isinstance(value, dict) else value
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        what = f"image file {shown}" if isinstance(value, str) else f"image {shown}"
        reason = "not an image file Pillow can read" if isinstance(e, UnidentifiedImageError) else str(e)
        return f"{what} cannot be decoded ({reason}); replace it with a PNG or JPEG, or drop the row"
    return None


# --- the set as a whole ---------------------------------------------------------------------


_PLURAL = {"an integer": "integers", "a class name": "class names"}


def _kind(label: Any) -> str:
    return "an integer" if isinstance(label, int) else "a class name"


def label_problems(labels: Sequence[Any], training: bool) -> list[list[str]]:
    """The problems of each row's label seen against the others: mixed integers and class names;
    in a training set, a class with fewer than MIN_EXAMPLES_PER_CLASS examples."""
    out: list[list[str]] = [[] for _ in labels]
    kinds = Counter(_kind(v) for v in labels)
    if len(kinds) > 1:
        # the kind most rows use (on a tie, the first row's) is taken as meant
        usual = max(kinds, key=lambda k: (kinds[k], k == _kind(labels[0])))
        for i, v in enumerate(labels):
            if _kind(v) != usual:
                out[i].append(f'"label" {json.dumps(v)} is {_kind(v)}, but {kinds[usual]} other labels are '
                              f"{_PLURAL[usual]}; give every label as a class name or every one as an integer")
    if training:
        counts = Counter(labels)
        for i, v in enumerate(labels):
            if counts[v] < MIN_EXAMPLES_PER_CLASS:
                out[i].append(f"class {json.dumps(v)} has only this example; a class needs at least "
                              f"{MIN_EXAMPLES_PER_CLASS} training examples: add more or drop the row")
    return out


def check_rows(
    source: Source, rows: Sequence[tuple[Record, dict[str, Any]]], fmt: str, training: bool,
) -> list[tuple[dict[str, Any], list[str]]]:
    """Each row (canonical, with no problem of its own) with its image resolved and decoded, and the
    problems found: the image, then the label seen against the other rows (imageLabel)."""
    checked: list[tuple[dict[str, Any], list[str]]] = []
    for record, row in rows:
        base = base_folder(source, record.file)
        image = resolve(row["image"], base)
        problem = decode_problem(image, base)
        checked.append(({**row, "image": image}, [problem] if problem else []))
    if fmt == "imageLabel" and checked:
        for (_, found), more in zip(checked, label_problems([r["label"] for r, _ in checked], training)):
            found += more
    return checked


def class_names(labels: Sequence[Any]) -> list[str]:
    """The class names of a label column in id order: integers (or names that are integers, as
    ImageFolder's "3") by value, then the other names alphabetically; 3 and "3" are one class."""
    def order(name: str) -> tuple[int, int, str]:
        return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)

    return sorted({str(v) for v in labels}, key=order)


class ImageRows:
    """A map-style dataset of rows with their image opened: {"image": PIL image (augmented when
    `augment` is given), **fields(row)}, e.g. fields=lambda r: {"caption": r["caption"]}."""

    def __init__(self, rows: Sequence[dict[str, Any]], fields: Callable[[dict[str, Any]], dict[str, Any]],
                 augment: Callable[[Any], Any] | None = None) -> None:
        self.rows, self.fields, self.augment = rows, fields, augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        image = open_image(row["image"])
        if self.augment is not None:
            image = self.augment(image)
        return {"image": image, **self.fields(row)}

