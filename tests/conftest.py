"""Fixtures shared by more than one test folder: the generated spoken digits and a Whisper trained on them
once per session (tests/trainer/test_speech.py proves it learned; tests/serving/test_serve_speech.py serves it).
Torch uses one thread while training it, as the trainer tests and `kubetune serve` in the serving tests do, so
the served model hears exactly what the trainer's evaluation heard.

`make unit` runs the tests on two pytest-xdist workers, one torch thread each (`--dist loadgroup`): each test
file is one group, so its module fixtures run once, and every file that uses the session's Whisper joins
one group, so Whisper is trained once. The other session fixtures (the tiny llama and its SFT, a minute
together) are made once per worker."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "trainer"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")

@pytest.fixture(scope="session")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The generator's full-size transcribed set: 400 training clips, 96 held out (unseen voice/speed pairs),
    and 400 clips without transcripts for audioPretrain ("speech/train")."""
    from kubetune_trainer.data.synthetic_speech import make_speech

    paths = make_speech(tmp_path_factory.mktemp("spoken"), seed=0, n_unlabelled=400)
    return {"asr/train": paths["speech/train"], "asr/validation": paths["speech/validation"],
            "speech/train": paths["speech/unlabelled"], "speech/validation": paths["speech/validation"]}


@pytest.fixture(scope="session")
def whisper(spoken: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """(the stage folder, its metrics.json) of Whisper trained from model.init for WHISPER_STEPS steps."""
    import torch
    from trainer_helpers import SPEECH_HP, WHISPER, WHISPER_STEPS, Trainer, report

    torch.set_num_threads(1)
    trainer = Trainer(spoken, tmp_path_factory.mktemp("whisper"))
    run = trainer.stage_run("whisper", "asr", "audioTranscript", "asr", init=WHISPER,
                            hp={**SPEECH_HP, "maxSteps": WHISPER_STEPS, "learningRate": 1e-3})
    metrics = trainer.train(run)
    report(f"asr Whisper from model.init ({WHISPER_STEPS} steps)", metrics)
    return Path(run["outputUri"]), metrics


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The xdist groups of `make unit`: one per test file, and one for the files that use `whisper`, run first."""
    whisper_files = {item.path for item in items if "whisper" in getattr(item, "fixturenames", ())}
    for item in items:
        group = "whisper" if item.path in whisper_files else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
    # the Whisper group is the longest (about half of one worker's time): first, so that a worker starts it at once
    items.sort(key=lambda item: item.path not in whisper_files)
