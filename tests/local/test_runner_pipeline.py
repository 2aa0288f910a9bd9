"""`kubetune run` beyond one process and one stage: `--nproc 2` trains a stage on two processes
(real torchrun, gloo), and a two-stage run killed after its first stage finished resumes with
`--resume` at the second stage, leaving the first stage's model as it was."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KUBETUNE = [sys.executable, "-m", "kubetune.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
WORDS = "the quick brown fox jumps over a lazy dog while seven small cats sleep near one warm fire".split()
MODEL = "init: {hiddenSize: 32, numLayers: 1, numHeads: 2, maxPositionEmbeddings: 64, tokenizer: {train: {vocabSize: 300}}}"


def _stage(name: str, max_steps: int, save_steps: int) -> str:
    return f"""
  - name: {name}
    type: pretrain
    dataset: {{uri: file://data/corpus.jsonl, format: text}}
    hyperparameters: {{maxSteps: {max_steps}, batchSize: 4, maxLength: 32, packing: true,
                      learningRate: 1.0e-3, saveSteps: {save_steps}, loggingSteps: 2}}
    resources: {{gpusPerNode: 0}}"""


def _manifest(tmp: Path, name: str, stages: list[str]) -> Path:
    corpus = tmp / "data" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(json.dumps({"text": " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) + "."})
                              + "\n" for i in range(400)))
    path = tmp / f"{name}.yaml"
    path.write_text(f"apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {{name: {name}}}\n"
                    f"spec:\n  model: {{{MODEL}}}\n  stages:{''.join(stages)}\n")
    return path


def _run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(KUBETUNE + args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _steps(stage: str, output: str) -> list[int]:
    return [int(m) for m in re.findall(rf"^{stage} step (\d+)/", output, flags=re.M)]


def _checkpoints(stage_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in stage_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists())


def _wait_for(what: str, probe: Callable[[], Any], proc: subprocess.Popen[str], timeout: float = 600) -> None:
    """Poll `probe` until it holds; fail if the run ends first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not probe():
        assert proc.poll() is None, f"the run ended before {what}: " + (proc.stdout.read() if proc.stdout else "")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_nproc_2_trains_a_stage_on_two_processes(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, "two", [_stage("pt", max_steps=12, save_steps=100)])

    result = _run(["run", str(manifest), "--nproc", "2"], tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Started stage pt (pretrain) [1/1] nproc=2" in result.stdout
    stage_dir = tmp_path / "runs" / "two" / "pt"
    log = (stage_dir / "train.log").read_text()
    assert "Joined process group backend=gloo rank=0 worldSize=2" in log, log[-3000:]
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert metrics["globalStep"] == 12
    # two processes of batch 4 each: a global batch of 8 packed rows of 32 tokens per step
    assert metrics["tokensSeen"] == 12 * 2 * 4 * 32
    assert (stage_dir / "model.safetensors").exists()
    state = json.loads((tmp_path / "runs" / "two" / "run.json").read_text())
    assert [s["state"] for s in state["stages"]] == ["Succeeded"]


def test_a_run_killed_after_its_first_stage_resumes_at_the_second(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, "chain", [_stage("first", max_steps=12, save_steps=100),
                                             _stage("second", max_steps=300, save_steps=10)])
    run_dir = tmp_path / "runs" / "chain"
    first, second = run_dir / "first", run_dir / "second"
    proc = subprocess.Popen(KUBETUNE + ["run", str(manifest)], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for("the second stage's checkpoint-20", lambda: [c for c in _checkpoints(second) if c >= 20], proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: runner, torchrun and the trainer
        proc.wait()
    state = json.loads((run_dir / "run.json").read_text())
    assert [s["state"] for s in state["stages"]] == ["Succeeded", "Running"]
    saved = max(_checkpoints(second))
    assert 20 <= saved < 300
    first_model = hashlib.sha256((first / "model.safetensors").read_bytes()).hexdigest()
    first_mtime = (first / "model.safetensors").stat().st_mtime_ns

    resumed = _run(["run", str(manifest), "--resume"], tmp_path)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Skipped stage first: it succeeded before." in resumed.stdout
    assert "Resumed stage second (pretrain) [2/2]" in resumed.stdout
    assert _steps("first", resumed.stdout) == []
    steps = _steps("second", resumed.stdout)
    assert steps and min(steps) >= saved and steps[-1] == 300, f"restarted instead of resuming from checkpoint-{saved}"
    # the first stage was not run again, and the second still starts from its output
    assert (first / "model.safetensors").stat().st_mtime_ns == first_mtime
    assert hashlib.sha256((first / "model.safetensors").read_bytes()).hexdigest() == first_model
    stage_run = json.loads((second / "stagerun.json").read_text())
    assert stage_run["modelUri"].rstrip("/").endswith("runs/chain/first")
    state = json.loads((run_dir / "run.json").read_text())
    assert [s["state"] for s in state["stages"]] == ["Succeeded", "Succeeded"]
    assert json.loads((second / "metrics.json").read_text())["globalStep"] == 300
