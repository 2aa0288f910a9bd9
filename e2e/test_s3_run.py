"""`kubetune run` with s3:// for everything, against a real S3 server (SeaweedFS, e2e/s3.py).

    .venv/bin/python -m pytest e2e/test_s3_run.py

The data sets are read from s3; each checkpoint is on s3 while the stage still runs; the run is
killed after one, and its machine's copies are lost (the stage's local checkpoints and the
cache), as a lost node's would be; `--resume` takes the stage on from the checkpoint on s3 and
puts the model there. The keys, random per session, are in no log or state file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from e2e.conftest import wait_for
from e2e.s3 import BUCKET, SeaweedFS

SAVE_STEPS = 10


def manifest(prefix: str) -> str:
    return f"""
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {{name: s3-run}}
spec:
  model:
    init: {{architecture: llama, hiddenSize: 64, numLayers: 2, numHeads: 4, maxPositionEmbeddings: 128,
           tokenizer: {{train: {{vocabSize: 400}}}}}}
  output: {{uri: "{prefix}/models"}}
  stages:
  - name: pretrain
    type: pretrain
    dataset: {{uri: "{prefix}/data/pretrain/train.jsonl", format: text,
              validationUri: "{prefix}/data/pretrain/validation.jsonl"}}
    hyperparameters: {{maxSteps: 60, batchSize: 8, maxLength: 64, learningRate: 3.0e-3, packing: true,
                      loggingSteps: 1, saveSteps: {SAVE_STEPS}}}
    resources: {{gpusPerNode: 0}}
"""


def test_kubetune_run_on_s3_resumes_from_the_checkpoint_on_s3_after_its_machine_is_lost(
    s3: SeaweedFS, tmp_path: Path
) -> None:
    prefix = f"s3://{BUCKET}/run-{tmp_path.name}"
    data = tmp_path / "generated"
    subprocess.run([sys.executable, "-m", "kubetune_trainer.data.synthetic", "--out", str(data)], check=True,
                   capture_output=True)
    fs = s3.fs()
    for split in ("train", "validation"):
        fs.put_file(str(data / "pretrain" / f"{split}.jsonl"), f"{prefix}/data/pretrain/{split}.jsonl")
    (tmp_path / "job.yaml").write_text(manifest(prefix))
    cache = tmp_path / "cache"
    env = {**os.environ, **s3.env(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "KUBETUNE_CACHE": str(cache)}
    run = [sys.executable, "-m", "kubetune.cli", "run", "job.yaml"]
    log = tmp_path / "kubetune-run.log"

    # the first attempt: killed as soon as a complete checkpoint is on s3, while the stage still trains
    with log.open("wb") as out:
        first = subprocess.Popen(run, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    stage = tmp_path / "runs" / "s3-run" / "pretrain"

    def checkpoint_on_s3() -> int | None:
        if first.poll() is not None:
            raise AssertionError(f"kubetune run ended before a checkpoint was on s3: {log.read_text()[-3000:]}")
        steps = [int(m.group(1)) for k in s3.keys(f"{prefix}/models/pretrain")
                 if (m := re.fullmatch(r"checkpoint-(\d+)/trainer_state\.json", k))]
        return max(steps) if steps else None
    on_s3 = wait_for("a complete checkpoint on s3", checkpoint_on_s3, timeout=300, interval=0.2)
    progress = json.loads((stage / "progress.json").read_text())
    assert progress["state"] == "running" and progress["step"] < 60  # uploaded while the stage runs
    assert progress["lastCheckpoint"].startswith(f"{prefix}/models/pretrain/checkpoint-")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    remote = [k for k in s3.keys(f"{prefix}/models/pretrain") if k.startswith("checkpoint-")]
    newest = max(int(m.group(1)) for k in remote if (m := re.fullmatch(r"checkpoint-(\d+)/trainer_state\.json", k)))
    assert f"checkpoint-{newest}/model.safetensors" in remote and f"checkpoint-{newest}/optimizer.pt" in remote

    # the machine is lost: its checkpoints and its cache go with it; run.json (the run's state) is kept
    for p in stage.glob("checkpoint-*"):
        shutil.rmtree(p)
    shutil.rmtree(cache, ignore_errors=True)
    resumed = subprocess.run([*run, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    train_log = (stage / "train.log").read_text()
    second = train_log[train_log.rindex("Fetched checkpoint"):]
    assert f"Fetched checkpoint uri={prefix}/models/pretrain/checkpoint-{newest} step={newest}" in train_log
    assert re.search(rf"Resuming from checkpoint path=\S*checkpoint-{newest}\b", second)
    first_step_after = min(int(s) for s in re.findall(r"Trained step=(\d+)/", second))
    assert first_step_after == newest + 1
    print(f"checkpoint-{on_s3} on s3 while the stage ran; resumed from checkpoint-{newest} on s3 "
          f"after the machine's copies were deleted")

    # the outputs are on s3: the model, its metrics and the checkpoints (e2e/operator/test_e2e_operator_s3.py
    # has a next stage start from a model on s3)
    pretrain = s3.keys(f"{prefix}/models/pretrain")
    assert {"model.safetensors", "metrics.json", "tokenizer.json", "checkpoint-60/trainer_state.json"} <= set(pretrain)
    assert json.loads(fs.cat_file(f"{prefix}/models/pretrain/metrics.json"))["globalStep"] == 60

    # the keys are in no log, no state file, nothing the run wrote
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and p.suffix in (".json", ".log", ".txt")]
    for p in [*written, log]:
        text = p.read_text(errors="replace")
        assert s3.secret_key not in text and s3.access_key not in text, p
    assert s3.secret_key not in resumed.stdout + resumed.stderr
