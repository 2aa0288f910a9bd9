"""GRPO: the built-in rewards on hand-made answers, and the learning proof: from an SFT model
stopped early (partly right on held-out prompts), GRPO with the exact-match reward raises
held-out exact match by at least 0.10 (measured: +0.145, 0.29 -> 0.435, in 600 steps)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune.api.registry import GrpoSpec
from kubetune_trainer.recipes import grpo
from trainer_helpers import Trainer, report

# Where GRPO starts: SFT stopped early, so the model answers some held-out puzzles right
# and samples right answers often enough for groups to disagree.
EARLY_SFT_STEPS = 110


def test_exact_and_numeric_match_score_against_the_reference() -> None:
    assert grpo.exact_match([" e w q", "e  w q ", "q w e"], ["e w q"] * 3) == [1.0, 1.0, 0.0]
    chat = [[{"role": "assistant", "content": "e w q"}]]
    assert grpo.exact_match(chat, ["e w q"]) == [1.0]
    assert grpo.numeric_match(["the answer is 1,024", "42.0", "no number", "7"], ["1024", "42", "3", "-7"]) == \
        [1.0, 1.0, 0.0, 0.0]


def test_format_and_length_rewards() -> None:
    fmt = grpo.format_reward(r"[A-Z]( [A-Z])*")
    assert fmt([" Q W E", "Q w E", "QWE "], ) == [1.0, 0.0, 0.0]
    penalty = grpo.length_penalty(8)
    assert penalty(["a", "b"], completion_ids=[[1, 2], [1] * 20]) == [-0.25, -1.0]


def test_reward_functions_follow_the_spec_in_order() -> None:
    spec = GrpoSpec(reward_functions=["lengthPenalty", "exactMatch", "format"], format_pattern="x+", max_completion_length=4)
    funcs = grpo.reward_functions(spec)
    assert [f.__name__ for f in funcs] == ["length_penalty", "exact_match", "format"]


def test_prompt_rows_take_the_reference_from_the_completion_or_the_last_answer() -> None:
    rows = [{"prompt": "a b reversed:", "completion": " b a"},
            {"messages": [{"role": "user", "content": "a b reversed:"}, {"role": "assistant", "content": "b a"}]}]
    assert grpo.prompt_rows(rows) == [
        {"prompt": "a b reversed:", "reference": " b a"},
        {"prompt": [{"role": "user", "content": "a b reversed:"}], "reference": "b a"},
    ]


@pytest.fixture(scope="module")
def early_sft(session_trainer: Trainer, pretrained: tuple[Path, dict[str, Any]]) -> Iterator[tuple[Path, dict[str, Any]]]:
    run = session_trainer.stage_run(
        "sft-early", "sft", "promptCompletion", "sft", model=pretrained[0],
        hp={"maxSteps": EARLY_SFT_STEPS, "batchSize": 32, "learningRate": 3e-3, "loggingSteps": 30},
    )
    yield Path(run["outputUri"]), session_trainer.train(run)


@pytest.mark.slow
def test_grpo_raises_exact_match_from_a_partly_right_sft_model(
    trainer: Trainer, early_sft: tuple[Path, dict[str, Any]],
) -> None:
    start = early_sft[1]["after"]["exactMatch"]
    assert 0.2 <= start <= 0.7, f"the SFT model should be partly right to start GRPO from, got {start}"
    run = trainer.stage_run(
        "grpo", "grpo", "promptCompletion", "sft", model=early_sft[0], referenceModelUri=str(early_sft[0]),
        hp={"maxSteps": 600, "batchSize": 256, "learningRate": 1e-3, "lrSchedulerType": "constant_with_warmup",
            "warmupRatio": 0.05, "loggingSteps": 20, "saveSteps": 300},
        grpo={"numGenerations": 16, "maxCompletionLength": 8, "beta": 0.01, "temperature": 1.0,
              "rewardFunctions": ["exactMatch"]},
    )
    metrics = trainer.train(run)
    report("grpo (exact-match reward, full)", metrics)
    print(f"grpo rl figures: {metrics['rl']}")
    assert metrics["primary"] == "exactMatch"
    assert metrics["before"]["exactMatch"] == pytest.approx(start, abs=1e-9)
    # 16 prompts a step, 16 samples each at temperature 1.0, KL weight 0.01, 600 steps: +0.145 (0.29 -> 0.435), about
    # 5 minutes on 2 CPU cores (transformers 5.24, TRL 1.16). Held-out exact match of one 1300-step run's checkpoints
    # (2026-12-03): 0.365 at 200 steps, 0.435 at 300, 0.44-0.47 from 400 to 1300 (0.45 at the end): the gain is made
    # by step 400, and runs of the same settings differ by about 0.03. This test ran 1300 steps with a bar of 0.15
    # until then (+0.19 when it was set; +0.16 on 2026-12-03), twice the time for a gain within that spread.
    # The same budget and seed, other settings (1300 steps): temperature 0.5 and beta 0.04 +0.135; temperature 1.0,
    # beta 0.04 +0.165; temperature 0.7 and beta 0.01 +0.155; temperature 1.0, beta 0.04, learning rate 2e-3 +0.14.
    # Earlier, with 8 samples and 800 steps +0.14; numIterations 2 +0.10 at 800 and 1200 steps.
    assert metrics["after"]["exactMatch"] - metrics["before"]["exactMatch"] >= 0.10
    rl = metrics["rl"]
    assert rl["rewardLast"] > rl["rewardFirst"]
    assert 0.0 <= rl["klLast"] < 1.0  # the policy stayed near the reference
    progress = json.loads((Path(run["outputUri"]) / "progress.json").read_text())
    assert set(progress["rl"]) >= {"reward", "kl", "entropy"}
