"""kubetune-train's contract with the operator: exit codes, refusals before training, progress and checkpoints."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from kubetune_trainer import common, launch
from trainer_helpers import TINY_INIT, Trainer


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ValueError("learning rate must be positive"), launch.EXIT_PERMANENT),
        (launch.StageNotImplemented("stage type ppo is not implemented yet"), launch.EXIT_PERMANENT),
        (FileNotFoundError("no model at /models/x"), launch.EXIT_PERMANENT),
        (KeyError("a bug"), launch.EXIT_PERMANENT),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), launch.EXIT_OOM),
        (MemoryError(), launch.EXIT_OOM),
        (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"), launch.EXIT_DISTRIBUTED),
        (torch.distributed.DistBackendError("gloo: connection closed"), launch.EXIT_DISTRIBUTED),
        (OSError(errno.EIO, "Input/output error"), launch.EXIT_IO),
        (ConnectionResetError("s3 connection reset"), launch.EXIT_IO),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), launch.EXIT_ACCELERATOR),
    ],
)
def test_exit_codes_tell_retryable_from_permanent(exc: BaseException, code: int) -> None:
    assert launch.exit_code_for(exc) == code
    # the training-operator's ExitCode policy: 1-127 permanent, 128-255 retryable
    assert (128 <= code <= 255) == (code in (launch.EXIT_OOM, launch.EXIT_DISTRIBUTED, launch.EXIT_IO, launch.EXIT_ACCELERATOR))


def test_an_oom_wrapped_in_another_error_stays_retryable() -> None:
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("training step failed") from inner
    except RuntimeError as outer:
        assert launch.exit_code_for(outer) == launch.EXIT_OOM


def test_unimplemented_stage_type_is_refused_permanently(trainer: Trainer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from kubetune.api import registry

    # every stage type has its recipe today: mark one as having none, as a row added before its recipe would be
    monkeypatch.setitem(registry.STAGE_TYPES, "asr", replace(registry.get("asr"), implemented=False))
    run = trainer.stage_run("asr", "asr", "audioTranscript", "sft", model=tmp_path / "none")
    code, metrics = trainer.run(run)
    assert code == launch.EXIT_PERMANENT and metrics is None
    error = (Path(run["outputUri"]) / "error.txt").read_text()
    assert "stage type asr is not implemented yet" in error
    assert json.loads((Path(run["outputUri"]) / "progress.json").read_text())["state"] == "failed"


def test_bad_data_never_starts_training(trainer: Trainer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\nnot json\n')
    run = trainer.stage_run("pretrain", "pretrain", "text", "pretrain", init=TINY_INIT, validation=False,
                            hp={"maxSteps": 5, "saveSteps": 1})
    run["dataset"]["uri"] = str(bad)
    code, _ = trainer.run(run)
    out = Path(run["outputUri"])
    assert code == launch.EXIT_PERMANENT
    assert "line 2" in (out / "error.txt").read_text()
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()
    assert json.loads((out / "progress.json").read_text())["state"] == "failed"


def test_a_format_the_stage_cannot_read_is_refused(trainer: Trainer) -> None:
    run = trainer.stage_run("dpo", "dpo", "preference", "preference", model="/nowhere")
    run["dataset"]["format"] = "text"
    code, _ = trainer.run(run)
    assert code == launch.EXIT_PERMANENT
    assert "reads dataset.format preference" in (Path(run["outputUri"]) / "error.txt").read_text()


def test_bad_command_line_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["--no-such-flag"]) == launch.EXIT_USAGE


def test_validate_subcommand_checks_a_data_set(synthetic: dict[str, Path], tmp_path: Path) -> None:
    assert launch.main(["validate", "--format", "preference", str(synthetic["preference/train"])]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    assert launch.main(["validate", "--format", "preference", str(bad)]) == 1


def test_incomplete_checkpoints_are_ignored(tmp_path: Path) -> None:
    for step, complete in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert common.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    common.drop_incomplete_checkpoints(tmp_path)
    assert not (tmp_path / "checkpoint-30").exists() and (tmp_path / "checkpoint-20").exists()


@pytest.mark.parametrize(("stage", "offload"), [(2, "none"), (3, "cpu")])
def test_deepspeed_config_follows_the_stage_run(trainer: Trainer, stage: int, offload: str) -> None:
    from kubetune.api import StageRun

    run = trainer.stage_run("sft", "sft", "promptCompletion", "sft", model="/m",
                            distributed={"deepspeed": {"zeroStage": stage, "offload": offload}})
    config = common.deepspeed_config(StageRun.model_validate(run))
    assert config is not None
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # filled in from TrainingArguments
    assert ("offload_optimizer" in zero) == (offload == "cpu")
    assert ("offload_param" in zero) == (offload == "cpu" and stage == 3)
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)


def test_metrics_endpoint_serves_trainer_metrics() -> None:
    import socket
    import urllib.request

    from kubetune_trainer.callbacks import Metrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = Metrics("job-a", "sft", port)
    try:
        metrics.step.set(7)
        metrics.loss.set(1.5)
        metrics.tokens.inc(1000)
        before_rl = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        metrics.set_rl("reward", 0.25)
        metrics.set_rl("kl", 0.01)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.close()
    # `finetunejob`, not `job`: Prometheus keeps `job` for the scrape job
    assert 'kubetune_trainer_step{finetunejob="job-a",stage="sft"} 7.0' in body
    assert 'kubetune_trainer_loss{finetunejob="job-a",stage="sft"} 1.5' in body
    assert 'kubetune_trainer_tokens_total{finetunejob="job-a",stage="sft"} 1000.0' in body
    # RL figures appear once an RL stage reports them, not as zeros on every stage
    assert "kubetune_trainer_reward" not in before_rl
    assert 'kubetune_trainer_reward{finetunejob="job-a",stage="sft"} 0.25' in body
    assert 'kubetune_trainer_kl{finetunejob="job-a",stage="sft"} 0.01' in body
    for name in ("total_steps", "learning_rate", "tokens_per_second", "samples_per_second", "epoch"):
        assert f"kubetune_trainer_{name}" in body


@pytest.mark.parametrize(("worker_exit", "agent_exit"), [(201, 201), (1, 1), (-9, 137)])
def test_agent_exits_with_the_failed_workers_code(monkeypatch: pytest.MonkeyPatch, worker_exit: int, agent_exit: int) -> None:
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failing_torchrun(args: object) -> None:
        failure = ProcessFailure(local_rank=1, pid=4242, exitcode=worker_exit, error_file="<N/A>")
        raise ChildFailedError("kubetune_trainer.launch", {1: failure})

    monkeypatch.setattr(torch.distributed.run, "run", failing_torchrun)
    assert launch.main(["--nproc-per-node", "2", "stagerun.json"]) == agent_exit


def test_agent_stopped_by_sigterm_exits_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod deleted, drained or preempted gets SIGTERM: torchrun's agent handler turns it into an
    exception once the workers are stopped; the pod must exit 143 (retryable), not 1 (permanent),
    or the training-operator never creates it again (seen on a real node: e2e/images/test_real_node.py)."""
    import os
    import signal

    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler

    def terminated_torchrun(args: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler torchrun's agent installs

    previous = signal.signal(signal.SIGTERM, _terminate_process_handler)
    try:
        monkeypatch.setattr(torch.distributed.run, "run", terminated_torchrun)
        monkeypatch.setenv("PET_NPROC_PER_NODE", "1")  # what the training-operator gives a CPU stage's pod
        assert launch.main(["stagerun.json"]) == 128 + signal.SIGTERM == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
