"""A trainer killed mid-stage: the training-operator restarts its pod, the stage resumes from its
newest complete checkpoint, and the job ends with the model an uninterrupted run makes.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_faults.py

The stand-in kubelet (conftest.Kubelet) runs the stage's master pod as a local process. The test
SIGKILLs the process that trains (the torchrun worker, as the kernel's OOM killer would): the
agent exits 137, the pod fails with it, and the training-operator, under the ExitCode restart
policy, deletes the pod and creates it again; the stand-in runs the replacement. A permanent
failure (exit 1, bad data) is not retried: test_e2e_operator_execute.py covers it.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from e2e.conftest import Cluster, wait_for
from e2e.operator.conftest import (
    FTJ,
    HOLD,
    PYTORCHJOBS,
    Kubelet,
    Operator,
    Workspace,
    apply,
    finetunejob,
    get,
    pod_annotations,
    running_pod,
    stage,
)

MAX_STEPS = 100
SAVE_STEPS = 10  # a kill loses at most this many steps


def tiny_pretraining(name: str) -> dict[str, Any]:
    """One-node CPU pretraining of a small Llama, checkpointing often. Large enough that a step takes
    well over 100 ms here: the status (read from the trainer every second) must show a checkpoint
    before the kill and the restart while the replacement trains, and with the 16 ms steps of the
    tiny Llama in test_e2e_operator_execute.py the replacement could finish its last 37 steps before
    the operator's next read (it did once, in CI)."""
    body = finetunejob(name, [stage(
        "pretrain", "pretrain", None, None,
        dataset={"uri": "pvc://data/tiny/pretrain/train.jsonl", "format": "text",
                 "validationUri": "pvc://data/tiny/pretrain/validation.jsonl"},
        resources={"nodes": 1, "gpusPerNode": 0},
        hyperparameters={"maxSteps": MAX_STEPS, "batchSize": 8, "maxLength": 128, "learningRate": 3.0e-3,
                         "loggingSteps": 1, "saveSteps": SAVE_STEPS, "packing": True},
    )], annotations=pod_annotations(HOLD))
    body["spec"]["model"] = {"init": {"architecture": "llama", "hiddenSize": 256, "numLayers": 4, "numHeads": 4,
                                      "maxPositionEmbeddings": 128, "tokenizer": {"train": {"vocabSize": 400}}}}
    return body


def stage_status(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    job = get(api, FTJ, ns, name) or {}
    return dict(((job.get("status") or {}).get("stages") or [{}])[0])


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value: dict[str, Any] = json.loads(path.read_text())
        return value
    except (OSError, ValueError):
        return None


def complete_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


def train_to_the_end(kubelet: Kubelet, core: client.CoreV1Api, ns: str, name: str) -> None:
    pod = f"{name}-pretrain-master-0"
    running_pod(core, ns, pod)
    kubelet.start(ns, pod, pod_ip="127.0.0.1")
    assert kubelet.wait(ns, pod, timeout=600) == 0, kubelet.log(ns, pod)[-3000:]


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_trainer_killed_mid_stage_resumes_from_its_newest_checkpoint_and_the_job_succeeds(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, workspace: Workspace, kubelet: Kubelet
) -> None:
    ns, root = workspace.namespace, workspace.pvc_root
    core = client.CoreV1Api(admin_api)
    subprocess.run([sys.executable, "-m", "kubetune_trainer.data.synthetic", "--out", str(root / "data" / "tiny")],
                   check=True, capture_output=True)

    # the reference: the same stage, never interrupted
    apply(cluster, tiny_pretraining("steady"), namespace=ns)
    train_to_the_end(kubelet, core, ns, "steady")
    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", ns, "ftj/steady", "--timeout=60s", timeout=90)

    apply(cluster, tiny_pretraining("killed"), namespace=ns)
    pod, out = "killed-pretrain-master-0", root / "models" / "killed" / "pretrain"
    first_uid = running_pod(core, ns, pod)
    kubelet.start(ns, pod, pod_ip="127.0.0.1")

    # the status shows the newest checkpoint while the first attempt runs
    def checkpoint_shown() -> dict[str, Any] | None:
        entry = stage_status(admin_api, ns, "killed")
        return entry if (entry.get("lastCheckpoint") or {}).get("step") else None
    shown_before = wait_for("the stage's status to show a checkpoint", checkpoint_shown, timeout=300, interval=0.2)

    # kill the trainer between two checkpoints, a few steps past the newest one
    def mid_interval() -> int | None:
        progress = read_json(out / "progress.json") or {}
        done = complete_checkpoints(out)
        step = int(progress.get("step") or 0)
        if step >= MAX_STEPS - SAVE_STEPS:
            pytest.fail(f"the trainer got to step {step} before it could be killed mid-stage")
        return step if done and step >= done[-1] + 3 and step % SAVE_STEPS < SAVE_STEPS - 3 else None
    wait_for("the trainer to be a few steps past a checkpoint", mid_interval, timeout=300, interval=0.02)
    agent, *workers = kubelet.processes(ns, pod)
    assert workers, "the torchrun agent started no worker"
    os.kill(workers[0], signal.SIGKILL)
    killed_at = time.monotonic()
    assert kubelet.wait(ns, pod, timeout=120) == 137  # the agent passes the worker's SIGKILL on
    newest_at_kill = complete_checkpoints(out)[-1]
    first_log = kubelet.log(ns, pod)
    last_step_before = max(int(s) for s in re.findall(r"Trained step=(\d+)/", first_log))

    # the training-operator replaces the pod; the stand-in kubelet runs the replacement
    running_pod(core, ns, pod, not_uid=first_uid)
    kubelet.start(ns, pod, pod_ip="127.0.0.1")

    def restart_shown() -> dict[str, Any] | None:
        entry = stage_status(admin_api, ns, "killed")
        if kubelet.procs[f"{ns}/{pod}"][0].poll() is not None:
            pytest.fail(f"the replacement pod finished before the status showed the restart: {entry}")
        shown = entry.get("state") == "Running" and (entry.get("restarts") or 0) >= 1 and \
            (entry.get("lastCheckpoint") or {}).get("step") and (entry.get("step") or 0) > newest_at_kill
        return entry if shown else None
    while_running = wait_for("the status to show the restart while the stage runs", restart_shown, timeout=300,
                             interval=0.2)
    assert kubelet.wait(ns, pod, timeout=600) == 0, kubelet.log(ns, pod)[-3000:]
    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", ns, "ftj/killed", "--timeout=60s", timeout=90)
    resumed_after = time.monotonic() - killed_at

    # the replacement resumed from the newest complete checkpoint and redid at most one interval
    second_log = kubelet.log(ns, pod)[len(first_log):]
    resumed = re.search(r"Resuming from checkpoint path=\S*/checkpoint-(\d+)", second_log)
    assert resumed, second_log[-3000:]
    resumed_from = int(resumed.group(1))
    first_step_after = min(int(s) for s in re.findall(r"Trained step=(\d+)/", second_log))
    redone = last_step_before - resumed_from
    print(f"killed after step {last_step_before}, resumed from checkpoint-{resumed_from} "
          f"(first step trained again: {first_step_after}): {redone} steps redone; "
          f"{resumed_after:.1f}s from the kill to the job's success")
    assert resumed_from == newest_at_kill and first_step_after == resumed_from + 1
    assert 0 < redone <= SAVE_STEPS

    # the status: restarts and the checkpoint while running; at the end the whole stage
    assert shown_before["lastCheckpoint"]["uri"] == \
        f"pvc://models/killed/pretrain/checkpoint-{shown_before['lastCheckpoint']['step']}"
    assert while_running["restarts"] == 1 and while_running["lastRestartTime"]
    assert while_running["lastCheckpoint"]["step"] >= resumed_from
    assert while_running["tokensTrained"] > 0 and "samplesTrained" not in while_running
    final = stage_status(admin_api, ns, "killed")
    assert (final["state"], final["step"], final["restarts"]) == ("Succeeded", MAX_STEPS, 1)
    pj = get(admin_api, PYTORCHJOBS, ns, "killed-pretrain") or {}
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in pj["status"]["conditions"])

    # the model is the one the uninterrupted run made: the held-out loss, and the weights bit for bit (one CPU
    # process is deterministic, and the Trainer restores the RNG states and the data order from the checkpoint)
    steady_out = root / "models" / "steady" / "pretrain"
    ours, theirs = (json.loads((o / "metrics.json").read_text()) for o in (out, steady_out))
    assert ours["globalStep"] == theirs["globalStep"] == MAX_STEPS
    assert ours["tokensSeen"] == theirs["tokensSeen"] >= final["tokensTrained"]  # redone steps not counted twice
    ours_loss, theirs_loss = ours["metrics"]["evalLoss"], theirs["metrics"]["evalLoss"]
    assert math.isfinite(ours_loss) and ours_loss == pytest.approx(theirs_loss, rel=1e-6)
    a, b = weights(out), weights(steady_out)
    assert a.keys() == b.keys()
    largest = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    scale = max(float(b[k].float().abs().max()) for k in b)
    print(f"held-out loss {ours_loss:.6f} killed vs {theirs_loss:.6f} steady; weights differ by at most "
          f"{largest:.3g} (largest weight {scale:.3g})")
    assert largest == 0.0
