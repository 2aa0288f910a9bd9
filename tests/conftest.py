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


# Seconds each long group takes in `make unit` (2 workers; the fresh-clone run of 2026-12-02, `--durations`, with
# the changes of 2026-12-03 measured alone: CTC one run of 1500 steps in place of two of 1000, GRPO 600 steps, the
# vision examples inside the clip and diffusion tests), so that the workers start the long ones first and end
# together; xdist hands out the groups in this order (`--no-loadscope-reorder`), and groups not listed (each under a
# minute) follow in file order.
GROUP_SECONDS = {
    "whisper": 582, "tests/trainer/test_speech_ctc.py": 560, "tests/trainer/test_grpo_recipe.py": 380,
    "tests/trainer/test_diffusion.py": 310, "tests/trainer/test_clip.py": 250, "tests/serving/test_vllm_cpu.py": 248,
    "tests/trainer/test_ppo.py": 210, "tests/trainer/test_distributed.py": 199,
    "tests/trainer/test_image_classification.py": 103, "tests/local/test_runner_pipeline.py": 82,
    "tests/local/test_runner.py": 81, "tests/trainer/test_preference_recipes.py": 74,
    "tests/serving/test_serve_clip.py": 65, "tests/trainer/test_peft_methods.py": 65, "tests/serving/test_serve.py": 64,
    "tests/bench/test_bench_gpu.py": 50, "tests/bench/test_bench_trainer_cpu.py": 40,
}


# Files that ask for `whisper` by name (request.getfixturevalue), which fixturenames does not show.
WHISPER_BY_NAME = ("tests/serving/test_serve_speech.py::",)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The xdist groups of `make unit`: one per test file, and one for the files that use `whisper`;
    the longest groups first (GROUP_SECONDS). First among the hooks: pytest-xdist's own (on each
    worker) reads the groups to write them into the tests' ids, which is what sends a group to one worker."""
    whisper_files = {item.path for item in items if "whisper" in getattr(item, "fixturenames", ())
                     or item.nodeid.startswith(WHISPER_BY_NAME)}
    groups: dict[pytest.Item, str] = {}
    for item in items:
        groups[item] = "whisper" if item.path in whisper_files else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    items.sort(key=lambda item: -GROUP_SECONDS.get(groups[item], 0))


def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """Stop a `--dist loadgroup` run whose tests came back without their groups: xdist would then hand
    out the tests one by one, and the files sharing the session's Whisper would train it on every worker."""
    if node.config.getvalue("dist") == "loadgroup" and ids and not any("@" in i for i in ids):
        raise pytest.UsageError(
            f"pytest-xdist's loadgroup lost the tests' groups on {node.gateway.id} (their ids carry no @group): "
            "this pytest and pytest-xdist do not work together; install the versions pyproject.toml allows")
