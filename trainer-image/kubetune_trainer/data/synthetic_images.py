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
    digits/captions-train.jsonl, digits/captions-validation.jsonl
                                              the same images captioned: {"image": "train/3/0042.png",
                                              "caption": "a handwritten three", "label": "three"}
                                              [imageCaption]; held-out captions all read "a handwritten
                                              <word>", training ones also "the digit <word>" (half of them)

<index> is the image's index in scikit-learn's set, so the same seed writes the same files.

Captioned shapes: a circle, square, triangle or cross in one of 6 colours, on the left, right, top,
bottom or in the middle of a noisy light background, `size` x `size` RGB PNGs drawn with Pillow.
Each image is a new draw (shape size, offset, colour shade, background and noise vary), so no
held-out image is a training image, though a held-out caption may repeat a training one: there
are 4 x 6 x 5 = 120 of them. Held-out captions all read "a red circle on the left" ("... in the
middle"); training captions also come as "a photo of a red circle on the left" and, a fifth of the
time each, without the colour or the position ("a circle on the left", "a photo of a red circle"),
so a text encoder also learns the shape word alone (zero-shot prompts: "a photo of a circle").
Every row carries its shape as `label`. Written under DIR as

    shapes/train/<index>.png, shapes/validation/<index>.png
    shapes/train.jsonl, shapes/validation.jsonl
                                              {"image": "train/00042.png", "caption": "a red
                                              circle on the left", "label": "circle"}  [imageCaption]
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

DIGIT_CLASSES = 10
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_caption(digit: int, plain: bool = True) -> str:
    """ "a handwritten seven" (plain), or "the digit seven"."""
    return f"a handwritten {DIGIT_WORDS[digit]}" if plain else f"the digit {DIGIT_WORDS[digit]}"


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
    "digits/train.jsonl": file, "digits/validation.jsonl": file, "digits/captions-train.jsonl": file,
    "digits/captions-validation.jsonl": file}."""
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
        rows: list[dict[str, Any]] = []
        for i in sorted(members):
            rel = f"{name}/{labels[i]}/{i:04d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            images[i].save(root / rel)
            rows.append({"image": rel, "label": labels[i]})
        index = root / f"{name}.jsonl"
        index.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[f"digits/{name}"] = root / name
        paths[f"digits/{name}.jsonl"] = index
        plain = [name != "train" or rng.random() < 0.5 for _ in rows]
        captioned = [{"image": r["image"], "caption": digit_caption(int(r["label"]), p),
                      "label": DIGIT_WORDS[int(r["label"])]} for r, p in zip(rows, plain, strict=True)]
        index = root / f"captions-{name}.jsonl"
        index.write_text("".join(json.dumps(r) + "\n" for r in captioned))
        paths[f"digits/captions-{name}.jsonl"] = index
    return paths


SHAPES = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215),
    "yellow": (225, 200, 30), "purple": (140, 55, 185), "orange": (240, 135, 25),
}
PARTIAL = 0.1  # the share of training captions without the colour, and without the position
POSITIONS = ("left", "right", "top", "bottom", "middle")
# where the shape's centre sits, as a share of the side: (x, y)
_WHERE = {"top": "at the top", "bottom": "at the bottom", "middle": "in the middle"}
_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "middle": (0.5, 0.5)}


def shape_caption(colour: str | None, shape: str, position: str | None, photo: bool = False) -> str:
    """ "a red circle on the left"; "a photo of an orange circle"; "a circle at the top"."""
    named = f"{colour} {shape}" if colour else shape
    words = ["a photo of" if photo else "", "an" if named[0] in "aeiou" else "a", named]
    if position:
        words.append(_WHERE.get(position, f"on the {position}"))
    return " ".join(w for w in words if w)


def draw_shape(shape: str, colour: str, position: str, size: int, rng: random.Random) -> Any:
    """One `size` x `size` RGB image of the shape (drawn at 4x and scaled down, so its edges are smooth)."""
    from PIL import Image, ImageDraw

    scale = 4
    side = size * scale
    grey = rng.randint(215, 250)
    image = Image.new("RGB", (side, side), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    r = side * rng.uniform(0.15, 0.21)  # the shape's half-width
    cx, cy = _CENTRES[position]
    cx, cy = side * (cx + rng.uniform(-0.05, 0.05)), side * (cy + rng.uniform(-0.05, 0.05))
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:  # cross
        w = r * 0.36
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    small = image.resize((size, size), Image.Resampling.LANCZOS)
    noise = bytes(rng.randint(0, 24) for _ in range(size * size * 3))  # sensor-like noise, darkening only
    from PIL import ImageChops

    return ImageChops.subtract(small, Image.frombytes("RGB", (size, size), noise))


def make_shapes(out_dir: str | Path, seed: int = 0, size: int = 32, n_train: int = 2000,
                n_val: int = 256) -> dict[str, Path]:
    """Write the captioned shapes (see the module docstring); returns {"shapes/train": folder,
    "shapes/validation": folder, "shapes/train.jsonl": file, "shapes/validation.jsonl": file}."""
    root = Path(out_dir) / "shapes"
    rng = random.Random(f"shapes-{seed}")
    paths: dict[str, Path] = {}
    for name, n in (("train", n_train), ("validation", n_val)):
        (root / name).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            shape, colour, position = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(POSITIONS)
            rel = f"{name}/{i:05d}.png"
            draw_shape(shape, colour, position, size, rng).save(root / rel)
            if name == "train":
                caption = shape_caption(None if rng.random() < PARTIAL else colour, shape,
                                        None if rng.random() < PARTIAL else position, photo=rng.random() < 0.5)
            else:
                caption = shape_caption(colour, shape, position)
            rows.append({"image": rel, "caption": caption, "label": shape})
        index = root / f"{name}.jsonl"
        index.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[f"shapes/{name}"] = root / name
        paths[f"shapes/{name}.jsonl"] = index
    return paths
