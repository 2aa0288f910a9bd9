"""Fixtures of the trainer tests: synthetic data, StageRuns, and two tiny models trained once per session.

Every model is built from a config (llama, hidden 64, 2 layers) with a tokenizer trained on the
synthetic corpus; nothing is downloaded (HF_HUB_OFFLINE=1). Torch uses one thread: these
models are too small to gain from more, and the test machines are shared.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from trainer_helpers import TINY_INIT, Trainer  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubetune_trainer.data.synthetic import make_all

    return make_all(tmp_path_factory.mktemp("synthetic"), seed=0)


@pytest.fixture(scope="session")
def session_trainer(synthetic: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    return Trainer(synthetic, tmp_path_factory.mktemp("session-runs"))


@pytest.fixture
def trainer(synthetic: dict[str, Path], tmp_path: Path) -> Trainer:
    return Trainer(synthetic, tmp_path)


@pytest.fixture(scope="session")
def pretrained(session_trainer: Trainer) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A tiny llama pretrained from scratch on the synthetic corpus (200 steps), and its metrics.json."""
    run = session_trainer.stage_run(
        "pretrain", "pretrain", "text", "pretrain", init=TINY_INIT,
        hp={"maxSteps": 200, "batchSize": 16, "maxLength": 64, "learningRate": 3e-3, "warmupRatio": 0.05,
            "saveSteps": 100, "saveTotalLimit": 1, "loggingSteps": 20},
    )
    metrics = session_trainer.train(run)
    yield Path(run["outputUri"]), metrics


@pytest.fixture(scope="session")
def sft_model(session_trainer: Trainer, pretrained: tuple[Path, dict[str, Any]]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The pretrained model fine-tuned on the letter puzzles (promptCompletion, full, 600 steps)."""
    run = session_trainer.stage_run(
        "sft", "sft", "promptCompletion", "sft", model=pretrained[0],
        hp={"maxSteps": 600, "batchSize": 32, "learningRate": 3e-3, "loggingSteps": 100},
    )
    metrics = session_trainer.train(run)
    yield Path(run["outputUri"]), metrics
