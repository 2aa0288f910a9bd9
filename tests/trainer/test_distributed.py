"""DeepSpeed ZeRO-2 and ZeRO-3 with two CPU processes (gloo), started by kubetune-train as torchrun does.

With the same global batch (2 processes x 4 = 1 process x 8) and the same seed, ZeRO-2 and
ZeRO-3 follow the single-process loss curve, of SFT and of DPO, to within LOSS_TOLERANCE
(measured: about 1e-6, summation order only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import Trainer, weights

LOSS_TOLERANCE = 1e-4
STEPS = 6

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def losses(out: Path) -> list[float]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def sft_run(trainer: Trainer, name: str, model: Path, zero: int | None, nproc: int) -> dict[str, Any]:
    return trainer.stage_run(
        name, "sft", "promptCompletion", "sft", model=model, validation=False,
        hp={"maxSteps": STEPS, "batchSize": 8 // nproc, "loggingSteps": 1, "saveSteps": STEPS, "learningRate": 1e-3},
        distributed={"deepspeed": {"zeroStage": zero}} if zero is not None else {},
    )


@pytest.fixture(scope="module")
def single_process_losses(synthetic: dict[str, Path], pretrained: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    trainer = Trainer(synthetic, tmp_path_factory.mktemp("one-process"))
    run = sft_run(trainer, "sft-1", pretrained[0], None, 1)
    trainer.train(run)
    return losses(Path(run["outputUri"]))


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_sft_on_two_processes_matches_one_process(
    trainer: Trainer, pretrained: tuple[Path, dict[str, Any]], single_process_losses: list[float], zero: int,
) -> None:
    run = sft_run(trainer, f"sft-zero{zero}", pretrained[0], zero, 2)
    done = trainer.subprocess(run, nproc=2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "worldSize=2" in done.stderr
    two = losses(Path(run["outputUri"]))
    print(f"\nZeRO-{zero} 2 processes: {two}\n1 process:             {single_process_losses}")
    assert len(two) == len(single_process_losses) == STEPS
    assert max(abs(a - b) for a, b in zip(two, single_process_losses, strict=True)) < LOSS_TOLERANCE
    assert two[-1] < two[0]
    # ZeRO-3 gathers the shards on save: the stage folder holds one full model
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run["outputUri"])


def dpo_run(trainer: Trainer, name: str, model: Path, zero: int | None, nproc: int) -> dict[str, Any]:
    return trainer.stage_run(
        name, "dpo", "preference", "preference", model=model, validation=False,
        hp={"maxSteps": STEPS, "batchSize": 8 // nproc, "loggingSteps": 1, "saveSteps": STEPS, "learningRate": 5e-4},
        distributed={"deepspeed": {"zeroStage": zero}} if zero is not None else {},
    )


@pytest.fixture(scope="module")
def single_process_dpo_losses(synthetic: dict[str, Path], sft_model: tuple[Path, dict[str, Any]],
                              tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    trainer = Trainer(synthetic, tmp_path_factory.mktemp("one-process-dpo"))
    run = dpo_run(trainer, "dpo-1", sft_model[0], None, 1)
    trainer.train(run)
    return losses(Path(run["outputUri"]))


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_dpo_on_two_processes_matches_one_process(
    trainer: Trainer, sft_model: tuple[Path, dict[str, Any]], single_process_dpo_losses: list[float], zero: int,
) -> None:
    """DPO keeps a reference model beside the policy; under ZeRO both are sharded. The run follows
    the single-process loss curve, starts at log 2 (the policy equals its reference) and learns."""
    run = dpo_run(trainer, f"dpo-zero{zero}", sft_model[0], zero, 2)
    done = trainer.subprocess(run, nproc=2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "worldSize=2" in done.stderr
    two = losses(Path(run["outputUri"]))
    print(f"\nZeRO-{zero} DPO 2 processes: {two}\n1 process:                 {single_process_dpo_losses}")
    assert len(two) == len(single_process_dpo_losses) == STEPS
    assert max(abs(a - b) for a, b in zip(two, single_process_dpo_losses, strict=True)) < LOSS_TOLERANCE
    assert two[0] == pytest.approx(math.log(2), abs=1e-3)
    assert two[-1] < two[0]
    # the saved policy is one full model, and training moved it away from its reference
    tuned, base = weights(Path(run["outputUri"])), weights(sft_model[0])
    assert any(not torch.equal(tuned[k], base[k]) for k in base if k.endswith("proj.weight"))
