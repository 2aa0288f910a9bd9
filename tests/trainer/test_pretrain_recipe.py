"""Pretraining: from scratch (config + trained tokenizer) and continued; what it writes for the next stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import TINY_INIT, Trainer, report, weights


@pytest.mark.slow
def test_pretraining_from_scratch_lowers_held_out_loss(pretrained: tuple[Path, dict[str, Any]]) -> None:
    out, metrics = pretrained
    report("pretrain from scratch", metrics)
    assert metrics["before"]["evalLoss"] > 5.0  # about ln(vocabulary): an untrained model
    assert metrics["after"]["evalLoss"] < 0.4 * metrics["before"]["evalLoss"]
    assert metrics["metrics"]["evalLoss"] == metrics["after"]["evalLoss"]


@pytest.mark.slow
def test_pretraining_writes_model_tokenizer_progress_and_checkpoints(pretrained: tuple[Path, dict[str, Any]]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    out, metrics = pretrained
    config = AutoConfig.from_pretrained(out)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 64, 2)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == config.vocab_size <= 400  # the byte-level BPE trained on the corpus
    assert tokenizer.decode(tokenizer("A kari has eight legs.")["input_ids"]) == "A kari has eight legs."
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.get_vocab()  # ready for a later sft stage
    assert (out / "model.safetensors").exists() and not (out / "tokenizer-init").exists()

    progress = json.loads((out / "progress.json").read_text())
    assert set(progress) == {"step", "totalSteps", "loss", "learningRate", "epoch", "etaSeconds",
                             "tokensPerSecond", "state", "lastCheckpoint", "updatedAt"}
    assert progress["state"] == "succeeded" and progress["step"] == progress["totalSteps"] == 200
    assert progress["tokensPerSecond"] > 0 and progress["loss"] == pytest.approx(metrics["trainLoss"])
    # saveSteps 100 with saveTotalLimit 1: only the newest checkpoint is kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-200"]
    assert progress["lastCheckpoint"] == f"{out}/checkpoint-200"


@pytest.mark.parametrize("architecture", ["gpt2", "qwen2"])
def test_other_architectures_build_and_train(trainer: Trainer, architecture: str) -> None:
    from transformers import AutoConfig

    run = trainer.stage_run("pretrain", "pretrain", "text", "pretrain",
                            init={**TINY_INIT, "architecture": architecture, "numKeyValueHeads": None},
                            hp={"maxSteps": 3, "maxLength": 32, "loggingSteps": 1})
    metrics = trainer.train(run)
    assert AutoConfig.from_pretrained(run["outputUri"]).model_type == architecture
    assert metrics["globalStep"] == 3 and metrics["trainLoss"] > 0


def test_continued_pretraining_updates_every_weight(trainer: Trainer, pretrained: tuple[Path, dict[str, Any]]) -> None:
    base = weights(pretrained[0])
    run = trainer.stage_run("more-pretraining", "pretrain", "text", "pretrain", model=pretrained[0],
                            hp={"maxSteps": 3, "maxLength": 32, "learningRate": 1e-3})
    trainer.train(run)
    tuned = weights(Path(run["outputUri"]))
    assert tuned.keys() == base.keys()
    unchanged = [k for k in base if (base[k] == tuned[k]).all()]
    assert unchanged == []
