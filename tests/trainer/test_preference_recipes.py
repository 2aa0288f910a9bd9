"""Reward model, DPO/IPO/hinge and KTO on the synthetic preference data, from the session's SFT model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import Trainer, report, weights


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "beta"), [("sigmoid", 0.5), ("ipo", 0.1)])
def test_dpo_raises_held_out_preference_accuracy(
    trainer: Trainer, sft_model: tuple[Path, dict[str, Any]], loss: str, beta: float,
) -> None:
    run = trainer.stage_run("dpo", "dpo", "preference", "preference", model=sft_model[0],
                            dpo={"loss": loss, "beta": beta}, hp={"maxSteps": 300, "learningRate": 1e-3, "loggingSteps": 100})
    metrics = trainer.train(run)
    report(f"dpo loss={loss}", metrics)
    # before training the policy is its reference: every implicit reward is 0, a tie
    assert metrics["before"]["preferenceAccuracy"] == pytest.approx(0.5, abs=0.05)
    assert metrics["after"]["preferenceAccuracy"] >= 0.9
    assert metrics["after"]["rewardMargin"] > 0
    tuned, base = weights(Path(run["outputUri"])), weights(sft_model[0])
    assert all(not torch.equal(tuned[k], base[k]) for k in base if k.endswith("proj.weight"))


def test_dpo_hinge_with_lora(trainer: Trainer, sft_model: tuple[Path, dict[str, Any]]) -> None:
    run = trainer.stage_run("hinge", "dpo", "preference", "preference", model=sft_model[0],
                            dpo={"loss": "hinge"}, tuning={"method": "lora"}, merge=True,
                            hp={"maxSteps": 4, "learningRate": 1e-3})
    metrics = trainer.train(run)
    assert metrics["globalStep"] == 4
    # an untrained adapter would score exactly 0.5 with no margin (every pair a tie): this one moved
    assert metrics["after"]["rewardMargin"] > 0 and metrics["after"]["preferenceAccuracy"] > 0.5
    out = Path(run["outputUri"])
    adapter = weights(out)  # adapter_model.safetensors
    lora_b = [k for k in adapter if ".lora_B." in k]
    assert lora_b and all(adapter[k].abs().max() > 0 for k in lora_b)  # PEFT starts every B at zero
    merged, base = weights(out / "merged"), weights(sft_model[0])
    changed = [k for k in base if k.endswith("proj.weight") and not torch.equal(merged[k], base[k])]
    assert len(changed) == len(lora_b)  # the merged model is the base plus each trained B @ A


def many_pairs(folder: Path, n_train: int) -> dict[str, Path]:
    """A larger preference set: the reward model must generalise, and 2000 pairs it memorises."""
    import json
    import random

    from kubetune_trainer.data.synthetic import preference_rows, puzzle_split

    train, held_out = puzzle_split(seed=1, n_train=n_train, n_val=200)
    rng = random.Random(1)
    paths = {}
    for split, prompts in (("train", train), ("validation", held_out)):
        paths[f"preference/{split}"] = folder / f"{split}.jsonl"
        paths[f"preference/{split}"].write_text("".join(json.dumps(r) + "\n" for r in preference_rows(prompts, rng)))
    return paths


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(trainer: Trainer, sft_model: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from transformers import AutoConfig

    trainer.data = {**trainer.data, **many_pairs(tmp_path, 30000)}
    run = trainer.stage_run("reward", "reward", "preference", "preference", model=sft_model[0],
                            hp={"maxSteps": 1500, "batchSize": 32, "learningRate": 1e-3, "lrSchedulerType": "cosine",
                                "warmupRatio": 0.05, "loggingSteps": 100})
    metrics = trainer.train(run)
    report("reward", metrics)
    assert 0.3 <= metrics["before"]["pairwiseAccuracy"] <= 0.7  # an untrained score head
    assert metrics["after"]["pairwiseAccuracy"] >= 0.9
    config = AutoConfig.from_pretrained(run["outputUri"])
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1


@pytest.mark.slow
def test_kto_separates_desirable_from_undesirable(trainer: Trainer, sft_model: tuple[Path, dict[str, Any]]) -> None:
    run = trainer.stage_run("kto", "kto", "unpairedPreference", "kto", model=sft_model[0],
                            hp={"maxSteps": 100, "learningRate": 2e-4, "loggingSteps": 50})
    metrics = trainer.train(run)
    report("kto", metrics)
    before, after = metrics["before"], metrics["after"]
    gap_before = before["desirableLogProb"] - before["undesirableLogProb"]
    gap_after = after["desirableLogProb"] - after["undesirableLogProb"]
    assert gap_after > gap_before + 1.0


@pytest.mark.slow
def test_kto_raises_desirable_log_probability(trainer: Trainer, pretrained: tuple[Path, dict[str, Any]]) -> None:
    """KTO from the pretrained model, weighting desirable rows x3 (the KTO paper's advice when
    undesirable ones are as many): held-out desirable completions become more likely."""
    run = trainer.stage_run("kto-raise", "kto", "unpairedPreference", "kto", model=pretrained[0],
                            hp={"maxSteps": 100, "learningRate": 2e-4, "loggingSteps": 50},
                            kto={"beta": 0.5, "desirableWeight": 3.0})
    metrics = trainer.train(run)
    report("kto-raise", metrics)
    assert metrics["after"]["desirableLogProb"] > metrics["before"]["desirableLogProb"] + 2.0


def test_kto_unpairs_preference_data(trainer: Trainer, sft_model: tuple[Path, dict[str, Any]]) -> None:
    run = trainer.stage_run("kto-pairs", "kto", "preference", "preference", model=sft_model[0],
                            hp={"maxSteps": 3, "learningRate": 1e-4})
    metrics = trainer.train(run)
    assert metrics["heldOutExamples"] == 200  # the first 200 of 400 rows: each pair gave a desirable and an undesirable one
    assert {"desirableLogProb", "undesirableLogProb"} <= set(metrics["after"])


def test_kto_needs_two_rows_per_batch(trainer: Trainer, sft_model: tuple[Path, dict[str, Any]]) -> None:
    run = trainer.stage_run("kto-one", "kto", "unpairedPreference", "kto", model=sft_model[0], hp={"batchSize": 1})
    code, _ = trainer.run(run)
    assert code == 1
    assert "batchSize to 2 or more" in (Path(run["outputUri"]) / "error.txt").read_text()
