"""examples/clip-tiny.yaml as a user runs it: the generated captioned shapes, `kubetune run`, and a CLIP
that finds held-out images by their captions and names their shapes zero-shot (clip end to end
through the local runner)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_clip_tiny_example_runs_and_learns_the_shapes(tmp_path: Path) -> None:
    from kubetune_trainer.data.synthetic_images import make_shapes

    make_shapes(tmp_path / "data")  # what `python -m kubetune_trainer.data.synthetic --out examples/data` writes
    shutil.copy(ROOT / "examples" / "clip-tiny.yaml", tmp_path)
    result = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", "clip-tiny.yaml"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    stage = tmp_path / "runs" / "clip-tiny" / "shapes"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["before"]["textToImageRecallAt1"] <= 0.15, metrics  # chance 1/32
    assert metrics["after"]["textToImageRecallAt1"] >= 0.9 and metrics["after"]["zeroShotAccuracy"] >= 0.9, metrics
    assert (stage / "processor_config.json").exists() and (stage / "tokenizer.json").exists()
