"""What the trainer reports for a stage's status: tokens and samples trained, the newest complete
checkpoint, read back as the operator reads the trainer's metrics endpoint."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from kubetune.backends import trainer_metrics
from kubetune_trainer import callbacks, common
from prometheus_client import generate_latest


def checkpoint(out: Path, step: int, complete: bool = True) -> None:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / common.TRAINER_STATE).write_text("{}")


def state(step: int, tokens: int) -> SimpleNamespace:
    return SimpleNamespace(is_world_process_zero=True, global_step=step, max_steps=100, epoch=step / 100,
                           num_input_tokens_seen=tokens)


ARGS = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=3)


def scraped(metrics: callbacks.Metrics) -> trainer_metrics.TrainerProgress:
    """What the operator reads from the trainer's endpoint."""
    return trainer_metrics.parse(generate_latest(metrics.registry).decode())


def counts(got: trainer_metrics.TrainerProgress) -> tuple[int | None, int | None, int | None, int | None]:
    return got.step, got.tokens, got.samples, got.checkpoint_step


def test_a_resumed_stage_reports_its_checkpoint_before_training_and_counts_from_it(tmp_path: Path) -> None:
    out = tmp_path / "sft"
    checkpoint(out, 20)
    checkpoint(out, 30, complete=False)  # cut short by the kill: not resumed from, not reported
    metrics = callbacks.Metrics("ft", "sft", port=0)
    cb = callbacks.ProgressCallback(out, "pvc://models/ft/sft", metrics)
    assert scraped(metrics).checkpoint_step == 20  # known while the model still loads

    # the Trainer restored step 20 and its token count from checkpoint-20
    cb.on_train_begin(ARGS, state(20, 5120), None)
    assert counts(scraped(metrics)) == (20, 5120, 20 * 4 * 2 * 3, 20)

    cb.on_log(ARGS, state(25, 6400), None, logs={"loss": 1.5, "learning_rate": 1e-4})
    checkpoint(out, 40)
    cb.on_save(ARGS, state(40, 10240), None)
    assert counts(scraped(metrics)) == (40, 10240, 40 * 24, 40)


def test_a_fresh_stage_reports_no_checkpoint(tmp_path: Path) -> None:
    metrics = callbacks.Metrics("ft", "sft", port=0)
    callbacks.ProgressCallback(tmp_path / "sft", "pvc://models/ft/sft", metrics)
    assert counts(scraped(metrics))[1:] == (0, 0, None)
