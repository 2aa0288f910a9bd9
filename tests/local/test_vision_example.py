"""examples/vision-tiny.yaml as a user runs it: the generated digits, `kubetune run`, and a classifier
that labels held-out digits (imageClassification end to end through the local runner)."""

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
def test_vision_tiny_example_runs_and_learns_the_digits(tmp_path: Path) -> None:
    from kubetune_trainer.data.synthetic_images import make_digits

    make_digits(tmp_path / "data")  # what `python -m kubetune_trainer.data.synthetic --out examples/data` writes
    shutil.copy(ROOT / "examples" / "vision-tiny.yaml", tmp_path)
    result = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", "vision-tiny.yaml"], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    stage = tmp_path / "runs" / "vision-tiny" / "digits"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["before"]["accuracy"] <= 0.2 and metrics["after"]["accuracy"] >= 0.95, metrics
    assert (stage / "confusion_matrix.png").exists() and (stage / "preprocessor_config.json").exists()
