"""python -m kubetune_trainer.data.synthetic --out DIR   (writes these beside the text sets)

Image data made by kubetune for demos and for tests that must show a model learned; nothing is
downloaded or shipped as image files.

Digits: the 1797 handwritten digits scikit-learn ships inside its package (8x8 pixels, 16 grey
levels, UCI optdigits), upscaled with bilinear filtering to `size` x `size` RGB PNGs, dark ink on
white. A stratified split by seed holds out `held_out` of each class. Written under DIR as

    digits/train/<digit>/<index>.png          ImageFolder layout  [imageLabel]
    digits/validation/<digit>/<index>.png
    digits/train.jsonl, digits/validation.jsonl
                                              the same rows as {"image": "train/3/0042.png",
                                              "label": 3} (integer labels, paths relative to the file)

<index> is the image's index in scikit-learn's set, so the same seed writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

DIGIT_CLASSES = 10


def digit_images(size: int = 32) -> tuple[list[Any], list[int]]:
    """Every digit as a `size` x `size` RGB PIL image, and its label."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for pixels in digits.images:  # floats 0 (paper) .. 16 (ink)
        grey = Image.frombytes("L", (8, 8), bytes(255 - int(round(v * 255 / 16)) for v in pixels.flatten()))
        images.append(grey.resize((size, size), Image.Resampling.BILINEAR).convert("RGB"))
    return images, [int(t) for t in digits.target]


def make_digits(out_dir: str | Path, seed: int = 0, size: int = 32, held_out: float = 0.2) -> dict[str, Path]:
    """Write the digits (see the module docstring); returns {"digits/train": folder, "digits/validation": folder,
    "digits/train.jsonl": file, "digits/validation.jsonl": file}."""
    root = Path(out_dir) / "digits"
    images, labels = digit_images(size)
    rng = random.Random(seed)
    split: dict[str, list[int]] = {"train": [], "validation": []}
    for digit in range(DIGIT_CLASSES):
        members = [i for i, y in enumerate(labels) if y == digit]
        rng.shuffle(members)
        k = round(len(members) * held_out)
        split["validation"] += sorted(members[:k])
        split["train"] += sorted(members[k:])
    paths: dict[str, Path] = {}
    for name, members in split.items():
        rows = []
        for i in sorted(members):
            rel = f"{name}/{labels[i]}/{i:04d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            images[i].save(root / rel)
            rows.append({"image": rel, "label": labels[i]})
        index = root / f"{name}.jsonl"
        index.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[f"digits/{name}"] = root / name
        paths[f"digits/{name}.jsonl"] = index
    return paths
