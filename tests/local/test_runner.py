"""`kubetune run`: a one-stage FineTuneJob runs here with real torchrun and the real trainer,
shows progress, is refused when it should be, and resumes after a kill from its checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

KUBETUNE = [sys.executable, "-m", "kubetune.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
WORDS = "the quick brown fox jumps over a lazy dog while seven small cats sleep near one warm fire".split()


def _corpus(path: Path, rows: int = 400) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(rows):
            words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)]
            f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")


def _manifest(tmp: Path, name: str, max_steps: int, stage_type: str = "pretrain", save_steps: int = 10,
              data_format: str = "text") -> Path:
    _corpus(tmp / "data" / "corpus.jsonl")
    path = tmp / f"{name}.yaml"
    text_only = "maxLength: 32, packing: true, " if data_format in ("text", "promptCompletion", "messages") else ""
    path.write_text(f"""
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {{name: {name}}}
spec:
  model:
    init:
      hiddenSize: 32
      numLayers: 1
      numHeads: 2
      maxPositionEmbeddings: 64
      tokenizer: {{train: {{vocabSize: 300}}}}
  stages:
  - name: pt
    type: {stage_type}
    dataset: {{uri: file://data/corpus.jsonl, format: {data_format}}}
    hyperparameters: {{maxSteps: {max_steps}, batchSize: 4, {text_only}
                      learningRate: 1.0e-3, saveSteps: {save_steps}, loggingSteps: 2}}
    resources: {{gpusPerNode: 0}}
""")
    return path


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(KUBETUNE + args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _steps(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"^pt step (\d+)/", output, flags=re.M)]


def _complete_checkpoints(stage_dir: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1]) for p in stage_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()
    )


def test_one_stage_runs_shows_progress_and_writes_a_model(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, "one", max_steps=12)
    result = _run(["run", str(manifest), "--runs-dir", "runs"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = _steps(result.stdout)
    assert steps and steps == sorted(steps) and steps[-1] == 12, result.stdout
    stage_dir = tmp_path / "runs" / "one" / "pt"
    assert (stage_dir / "config.json").exists() and (stage_dir / "model.safetensors").exists()
    assert any(stage_dir.glob("tokenizer*.json"))
    state = json.loads((tmp_path / "runs" / "one" / "run.json").read_text())
    assert [s["state"] for s in state["stages"]] == ["Succeeded"]
    status = _run(["status", "runs/one"], tmp_path)
    assert status.returncode == 0 and "Succeeded" in status.stdout and "12/12" in status.stdout


def test_killed_mid_stage_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, "resume", max_steps=300, save_steps=10)
    stage_dir = tmp_path / "runs" / "resume" / "pt"
    proc = subprocess.Popen(KUBETUNE + ["run", str(manifest)], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not [c for c in _complete_checkpoints(stage_dir) if c >= 20]:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed: " + (proc.stdout.read() if proc.stdout else "")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: runner, torchrun and the trainer
    proc.wait()
    saved = max(_complete_checkpoints(stage_dir))
    assert 20 <= saved < 300

    refused = _run(["run", str(manifest)], tmp_path)
    assert refused.returncode == 2 and "--resume" in refused.stdout

    resumed = _run(["run", str(manifest), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resumed stage pt" in resumed.stdout
    steps = _steps(resumed.stdout)
    assert steps and min(steps) >= saved, f"restarted instead of resuming from checkpoint-{saved}: {steps}"
    assert steps[-1] == 300


def test_ctrl_c_leaves_a_resumable_run(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, "interrupt", max_steps=5000, save_steps=5)
    stage_dir = tmp_path / "runs" / "interrupt" / "pt"
    # A terminal's foreground job has SIGINT at its default; a background job (as under CI) inherits
    # SIG_IGN, so put it back as the terminal would.
    proc = subprocess.Popen(KUBETUNE + ["run", str(manifest)], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _complete_checkpoints(stage_dir):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "kubetune run" in out and "--resume" in out
    state = json.loads((tmp_path / "runs" / "interrupt" / "run.json").read_text())
    assert state["stages"][0]["state"] == "Interrupted"
    assert _complete_checkpoints(stage_dir)


@pytest.mark.parametrize(("stage_type", "data_format"), [("asr", "audioTranscript")])
def test_stage_types_without_a_recipe_are_refused_before_anything_runs(
    tmp_path: Path, stage_type: str, data_format: str
) -> None:
    manifest = _manifest(tmp_path, "unbuilt", max_steps=5, stage_type=stage_type, data_format=data_format)
    # every stage type has its recipe today: mark one as having none, as a row added before its recipe would be
    unbuilt = ("import sys; from dataclasses import replace; from kubetune.api import registry; "
               f"registry.STAGE_TYPES[{stage_type!r}] = replace(registry.get({stage_type!r}), implemented=False); "
               "from kubetune.cli import main; sys.exit(main())")
    result = subprocess.run([sys.executable, "-c", unbuilt, "run", str(manifest)], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert f"stage type {stage_type} is not implemented yet" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_a_file_of_several_jobs_is_checked_whole_before_any_job_starts(tmp_path: Path) -> None:
    first = _manifest(tmp_path, "first", max_steps=5).read_text()
    second = _manifest(tmp_path, "second", max_steps=5).read_text()
    both = tmp_path / "both.yaml"
    both.write_text(first + "---" + second)
    (tmp_path / "runs" / "second").mkdir(parents=True)
    (tmp_path / "runs" / "second" / "run.json").write_text("{}")  # an earlier run of the second job
    result = _run(["run", str(both)], tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "holds an earlier run; pass --resume" in result.stdout
    assert not (tmp_path / "runs" / "first").exists()  # refused before the first job started

    twice = tmp_path / "twice.yaml"
    twice.write_text(first + "---" + first)
    result = _run(["run", str(twice)], tmp_path)
    assert result.returncode == 2 and "more than one FineTuneJob named first" in result.stdout, result.stdout
