"""QLoRA: LoRA adapters on an nf4 4-bit base (bitsandbytes runs 4-bit on CPU, slowly)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from kubetune.api import StageRun
from kubetune_trainer import models
from trainer_helpers import Trainer, weights


def test_qlora_loads_a_4bit_base(trainer: Trainer, pretrained: tuple[Path, dict[str, Any]]) -> None:
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    run = StageRun.model_validate(trainer.stage_run("q", "sft", "promptCompletion", "sft", model=pretrained[0],
                                                    tuning={"method": "qlora"}))
    model = models.load_model(run, AutoTokenizer.from_pretrained(pretrained[0]))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_type == "nf4"
    assert model.is_loaded_in_4bit


def test_qlora_sft_trains_adapters_on_a_frozen_4bit_base(trainer: Trainer, pretrained: tuple[Path, dict[str, Any]]) -> None:
    run = trainer.stage_run("qlora", "sft", "promptCompletion", "sft", model=pretrained[0],
                            tuning={"method": "qlora", "lora": {"r": 8, "alpha": 16}}, merge=True,
                            hp={"maxSteps": 4, "learningRate": 2e-3, "batchSize": 8})
    metrics = trainer.train(run)
    out = Path(run["outputUri"])
    adapter = weights(out)
    assert adapter and all("lora_" in k for k in adapter)
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    base, merged = weights(pretrained[0]), weights(out / "merged")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)
    assert metrics["method"] == "qlora" and metrics["trainLoss"] > 0
