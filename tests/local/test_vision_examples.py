"""The vision examples as a user runs them: the generated images, `kubetune run`, and a model that
learned them (imageClassification, then clip and diffusion, in one file of two jobs; clip alone),
end to end through the local runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def digits_learned(stage: Path, metrics: dict[str, Any]) -> None:
    assert metrics["before"]["accuracy"] <= 0.2 and metrics["after"]["accuracy"] >= 0.95, metrics
    assert (stage / "confusion_matrix.png").exists() and (stage / "preprocessor_config.json").exists()


def shapes_learned(stage: Path, metrics: dict[str, Any]) -> None:
    assert metrics["before"]["textToImageRecallAt1"] <= 0.15, metrics  # chance 1/32
    assert metrics["after"]["textToImageRecallAt1"] >= 0.9 and metrics["after"]["zeroShotAccuracy"] >= 0.9, metrics
    assert (stage / "processor_config.json").exists() and (stage / "tokenizer.json").exists()


def digits_drawn(stage: Path, metrics: dict[str, Any]) -> None:
    assert metrics["after"]["evalLoss"] <= 0.6 * metrics["before"]["evalLoss"], metrics  # down by 40% or more
    assert (stage / "model_index.json").exists() and (stage / "unet" / "config.json").exists()
    for name in ("samples_before.png", "samples_after.png"):
        from PIL import Image

        with Image.open(stage / name) as png:
            png.load()
            assert png.format == "PNG" and png.height >= 10 * 64  # a row per held-out caption


# example, the generator of its data, and for each of its jobs: job, stage, what it must have learned
EXAMPLES: list[tuple[str, str, list[tuple[str, str, Callable[[Path, dict[str, Any]], None]]]]] = [
    ("vision-tiny", "make_digits", [
        ("vision-tiny", "digits", digits_learned),
        ("diffusion-tiny", "generate", digits_drawn),  # clip, then diffusion on its text tower
    ]),
    ("clip-tiny", "make_shapes", [("clip-tiny", "shapes", shapes_learned)]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("example", "generator", "jobs"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_vision_example_runs_and_learns(
    tmp_path: Path, example: str, generator: str, jobs: list[tuple[str, str, Callable[[Path, dict[str, Any]], None]]],
) -> None:
    from kubetune_trainer.data import synthetic_images

    # what `python -m kubetune_trainer.data.synthetic --out examples/data` writes
    getattr(synthetic_images, generator)(tmp_path / "data")
    shutil.copy(ROOT / "examples" / f"{example}.yaml", tmp_path)
    result = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", f"{example}.yaml"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    for job, stage, learned in jobs:  # a file of several jobs runs each of them
        out = tmp_path / "runs" / job / stage
        learned(out, json.loads((out / "metrics.json").read_text()))
