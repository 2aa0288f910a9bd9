"""A stage killed mid-run (SIGKILL, as when a node dies) and started again resumes from its newest complete checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from kubetune_trainer import common
from trainer_helpers import TINY_INIT, Trainer


@pytest.mark.slow
def test_killed_stage_resumes_at_its_checkpoint(trainer: Trainer) -> None:
    run = trainer.stage_run("pretrain", "pretrain", "text", "pretrain", init=TINY_INIT, validation=False,
                            hp={"maxSteps": 300, "saveSteps": 10, "saveTotalLimit": 3, "loggingSteps": 5,
                                "batchSize": 8, "maxLength": 32, "learningRate": 1e-3})
    out = Path(run["outputUri"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(trainer.command(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while common.latest_checkpoint(out) is None and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, first.stderr.read() if first.stderr else ""
    resume_from = common.latest_checkpoint(out)
    assert resume_from is not None
    step = int(resume_from.name.split("-")[1])
    assert step < 300 and not (out / "metrics.json").exists()
    assert json.loads((out / "progress.json").read_text())["state"] == "running"

    second = trainer.subprocess(run)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from checkpoint path={resume_from}" in second.stderr
    trained_steps = [int(s) for s in re.findall(r"Trained step=(\d+)/300", second.stderr)]
    assert trained_steps and min(trained_steps) > step  # no step before the checkpoint was trained again
    state = json.loads((out / "checkpoint-300" / "trainer_state.json").read_text())
    assert state["global_step"] == 300
    logged = [e["step"] for e in state["log_history"] if "loss" in e]
    assert logged == sorted(set(logged))  # one history: the first attempt's logs, then the second's
    assert json.loads((out / "metrics.json").read_text())["globalStep"] == 300
    # the tokenizer trained by the first attempt was reused, not trained again
    assert not (out / "tokenizer-init").exists()
