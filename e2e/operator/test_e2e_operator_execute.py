"""Render -> execute: the pods the training-operator made for a stage train for real.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_execute.py

The operator renders a two-node CPU pretraining stage; the training-operator creates its
master and worker pods (with PET_* and MASTER_ADDR injected). `Kubelet` runs each pod's
container command here with the pod's own environment: MASTER_ADDR (the master's Service) maps
to 127.0.0.1, the claims to local folders through KUBETUNE_PVC_ROOT, the StageRun ConfigMap to
a folder. The two processes rendezvous, train, write the model, and their exit codes go into
the pods' status; the PyTorchJob and then the FineTuneJob succeed. While they train, the
operator reads the master's metrics endpoint (its pod IP set to 127.0.0.1, as the kubelet
reports the node-local address) and shows the trainer's progress in the job's status.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest
from kubernetes import client

from e2e.conftest import Cluster, wait_for
from e2e.operator.conftest import (
    FTJ,
    HOLD,
    Kubelet,
    Operator,
    Workspace,
    apply,
    condition,
    finetunejob,
    get,
    pod_annotations,
    stage,
)

# Long enough (a few seconds) for the operator, which reads the trainer's gauges every second
# (--progress-interval 1), to show progress while the pods run.
MAX_STEPS = 100
# The training-operator adds an `init-pytorch` container (it waits for the master's DNS name) to
# worker pods; the local cluster starts it with e2e/cluster/pytorch-init-container.yaml, whose
# securityContext PodSecurity "restricted" admits, so multi-node stages run there too.
POD_SECURITY = "restricted"


def tiny_pretraining() -> dict[str, Any]:
    body = finetunejob("exec", [stage(
        "pretrain", "pretrain", "pvc://data/tiny/pretrain/train.jsonl", "text",
        resources={"nodes": 2, "gpusPerNode": 0},
        hyperparameters={"maxSteps": MAX_STEPS, "batchSize": 8, "maxLength": 64, "learningRate": 3.0e-3,
                         "loggingSteps": 1, "saveSteps": 50, "packing": True},
    )], annotations=pod_annotations(HOLD))
    body["spec"]["model"] = {"init": {"architecture": "llama", "hiddenSize": 64, "numLayers": 2, "numHeads": 4,
                                      "maxPositionEmbeddings": 128, "tokenizer": {"train": {"vocabSize": 400}}}}
    return body


def test_the_pods_of_a_rendered_stage_train_and_the_job_succeeds(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, workspace: Workspace, kubelet: Kubelet
) -> None:
    ns, root = workspace.namespace, workspace.pvc_root
    subprocess.run([sys.executable, "-m", "kubetune_trainer.data.synthetic", "--out", str(root / "data" / "tiny")],
                   check=True, capture_output=True)
    apply(cluster, tiny_pretraining(), namespace=ns)
    core = client.CoreV1Api(admin_api)
    pods = ("exec-pretrain-master-0", "exec-pretrain-worker-0")
    for pod in pods:
        wait_for(f"pod {pod} to run", lambda: any(p.metadata.name == pod and p.status.phase == "Running"
                                                  for p in core.list_namespaced_pod(ns).items), timeout=90)
    env = {e.name: e.value for e in core.read_namespaced_pod(pods[1], ns).spec.containers[0].env}
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_NODE_RANK"]) == ("2", "1", "1")
    assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == pods[0]

    kubelet.start(ns, pods[0], pod_ip="127.0.0.1")
    kubelet.start(ns, pods[1])

    def progress_while_training() -> dict[str, Any] | None:
        """The job's stage status with the trainer's step and loss, read while a pod still trains."""
        job = get(admin_api, FTJ, ns, "exec") or {}
        entry = ((job.get("status") or {}).get("stages") or [{}])[0]
        if any(p.poll() is None for p, *_ in kubelet.procs.values()):
            shown = entry.get("totalSteps") and "loss" in (entry.get("metrics") or {})
            return {**entry, "progress": job["status"].get("progress")} if shown else None
        pytest.fail("the pods finished before the job's status showed the trainer's progress")

    seen = wait_for("the job's status to show the trainer's progress", progress_while_training, timeout=600,
                    interval=0.2)
    codes = [kubelet.wait(ns, pod, timeout=600) for pod in pods]

    assert codes == [0, 0], kubelet.log(ns, pods[0])[-3000:] + kubelet.log(ns, pods[1])[-3000:]
    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", ns, "ftj/exec", "--timeout=60s", timeout=90)
    out = root / "models" / "exec" / "pretrain"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["globalStep"] == MAX_STEPS and math.isfinite(metrics["trainLoss"])
    assert json.loads((out / "progress.json").read_text())["state"] == "succeeded"
    # the operator showed the trainer's progress while it ran, from the trainer's own gauges
    assert seen["totalSteps"] == MAX_STEPS and 0 <= seen["step"] <= MAX_STEPS
    assert seen["progress"].startswith("0/1 pretrain ") and seen["progress"].endswith("%")
    job = get(admin_api, FTJ, ns, "exec")
    assert job is not None and job["status"]["stages"][0]["step"] == MAX_STEPS


def start_one_node_pretraining(cluster: Cluster, core: client.CoreV1Api, ns: str, name: str, data_uri: str) -> str:
    """Apply a one-node tiny pretraining job reading `data_uri`; wait until its master pod runs; its name."""
    body = tiny_pretraining()
    body["metadata"]["name"] = name
    body["spec"]["output"]["uri"] = f"pvc://models/{name}"
    body["spec"]["stages"][0]["dataset"] = {"uri": data_uri, "format": "text"}
    body["spec"]["stages"][0]["resources"]["nodes"] = 1
    apply(cluster, body, namespace=ns)
    pod = f"{name}-pretrain-master-0"
    wait_for(f"pod {pod} to run", lambda: any(p.metadata.name == pod and p.status.phase == "Running"
                                              for p in core.list_namespaced_pod(ns).items), timeout=90)
    return pod


def test_a_stage_that_fails_on_bad_data_fails_the_job_with_the_trainers_reason(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, workspace: Workspace, kubelet: Kubelet
) -> None:
    ns, root = workspace.namespace, workspace.pvc_root
    (root / "data" / "broken.jsonl").write_text('{"text": "one"}\n{"txt": "two"}\n{"text": "three"}\n')
    core = client.CoreV1Api(admin_api)
    pod = start_one_node_pretraining(cluster, core, ns, "bad-data", "pvc://data/broken.jsonl")

    kubelet.start(ns, pod)
    assert kubelet.wait(ns, pod, timeout=300) == 1

    cluster.kubectl("wait", "--for=condition=Failed", "-n", ns, "ftj/bad-data", "--timeout=60s", timeout=90)
    message = condition(get(admin_api, FTJ, ns, "bad-data"), "Failed")["message"]
    assert message.startswith("Stage 1/1 pretrain failed: ")
    assert f"pod {pod} exited with code 1 (a permanent error" in message
    assert "line 2" in message, message
