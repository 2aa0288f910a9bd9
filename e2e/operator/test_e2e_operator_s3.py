"""Object storage for real on the cluster path: a two-stage job whose data, checkpoints and outputs
are all on a real S3 server (SeaweedFS, e2e/s3.py), with the pretraining pod deleted once and its
node lost once mid-stage.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_s3.py

The stages read the `kubetune-storage` Secret (envFrom). The trainer puts each checkpoint on s3 as
soon as it is written. A pod that is deleted, or whose node is gone, takes its emptyDir with it,
and so its local copies. The training-operator creates the pod again; after a node is lost, that
happens once the pod garbage collector has removed the orphaned pod. The replacement fetches the
newest complete checkpoint from s3 and resumes there, redoing at most one checkpoint interval.
The stand-in kubelet (conftest.Kubelet) runs the pods and gives each a new emptyDir. The sft stage
starts from the pretrained model on s3. The Secret's keys, random per session, appear in no log,
status, Event or object the operator writes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from safetensors.torch import load_file

from e2e.conftest import Cluster, wait_for
from e2e.operator.conftest import (
    FTJ,
    HOLD,
    PYTORCHJOBS,
    Kubelet,
    Operator,
    Workspace,
    apply,
    events,
    finetunejob,
    get,
    pod_annotations,
    running_pod,
    stage,
)
from e2e.s3 import BUCKET, SeaweedFS

MAX_STEPS = 200
SAVE_STEPS = 10


def s3_pipeline(name: str, prefix: str, stages: int = 2) -> dict[str, Any]:
    """Pretraining then SFT (or the first `stages` of them), everything on s3 under `prefix`."""
    cpu = {"nodes": 1, "gpusPerNode": 0}
    body = finetunejob(name, [
        stage("pretrain", "pretrain", None, None, resources=cpu,
              dataset={"uri": f"{prefix}/data/pretrain/train.jsonl", "format": "text",
                       "validationUri": f"{prefix}/data/pretrain/validation.jsonl"},
              hyperparameters={"maxSteps": MAX_STEPS, "batchSize": 8, "maxLength": 64, "learningRate": 3.0e-3,
                               "loggingSteps": 1, "saveSteps": SAVE_STEPS, "packing": True}),
        stage("sft", "sft", None, None, resources=cpu, tuning={"method": "lora", "lora": {"r": 8, "alpha": 16}},
              dataset={"uri": f"{prefix}/data/sft/train.jsonl", "format": "promptCompletion"},
              hyperparameters={"maxSteps": 20, "batchSize": 8, "maxLength": 64, "learningRate": 3.0e-3,
                               "saveSteps": 10}),
    ][:stages], annotations=pod_annotations(HOLD), output={"uri": f"{prefix}/{name}"})
    body["spec"]["model"] = {"init": {"architecture": "llama", "hiddenSize": 64, "numLayers": 2, "numHeads": 4,
                                      "maxPositionEmbeddings": 128, "tokenizer": {"train": {"vocabSize": 400}}}}
    return body


def complete_on_s3(s3: SeaweedFS, prefix: str) -> list[int]:
    return sorted(int(m.group(1)) for k in s3.keys(prefix) if (m := re.fullmatch(r"checkpoint-(\d+)/trainer_state\.json", k)))


def trained_steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"Trained step=(\d+)/", log)]


def test_a_pipeline_on_s3_survives_its_pod_deleted_and_its_node_lost(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, workspace: Workspace,
    kubelet: Kubelet, s3: SeaweedFS, tmp_path: Path,
) -> None:
    ns, name = workspace.namespace, "s3-pipeline"
    prefix = f"s3://{BUCKET}/{ns}"
    core = client.CoreV1Api(admin_api)
    core.create_namespaced_secret(ns, {"metadata": {"name": "kubetune-storage"}, "stringData": s3.env()})
    data = tmp_path / "generated"
    subprocess.run([sys.executable, "-m", "kubetune_trainer.data.synthetic", "--out", str(data)], check=True,
                   capture_output=True)
    for kind in ("pretrain", "sft"):
        for split in ("train", "validation"):
            s3.fs().put_file(str(data / kind / f"{split}.jsonl"), f"{prefix}/data/{kind}/{split}.jsonl")
    apply(cluster, s3_pipeline(name, prefix), namespace=ns)

    pod, out = f"{name}-pretrain-master-0", f"{prefix}/{name}/pretrain"
    uid = running_pod(core, ns, pod)
    container = core.read_namespaced_pod(pod, ns).spec.containers[0]
    assert [e.secret_ref.name for e in container.env_from] == ["kubetune-storage"]
    assert container.security_context.read_only_root_filesystem
    kubelet.start(ns, pod, pod_ip="127.0.0.1")

    def mid_interval(after: int) -> tuple[int, int] | None:
        """(newest complete checkpoint on s3, last step trained) once the trainer is a few steps past a
        checkpoint newer than `after` that is on s3."""
        steps = trained_steps(kubelet.log(ns, pod))
        done = [c for c in complete_on_s3(s3, out) if c > after]
        if steps and steps[-1] >= MAX_STEPS - SAVE_STEPS:
            raise AssertionError(f"the trainer got to step {steps[-1]} before it could be interrupted")
        return (done[-1], steps[-1]) if done and steps[-1] >= done[-1] + 3 else None

    interruptions: list[tuple[str, int, int]] = []  # (how, newest checkpoint on s3, last step trained)
    newest = 0
    for how in ("pod deleted", "node lost"):
        newest, last = wait_for(f"the trainer a few steps past a checkpoint on s3 ({how} next)",
                                lambda: mid_interval(newest), timeout=300, interval=0.1)
        node = core.read_namespaced_pod(pod, ns).spec.node_name
        if how == "pod deleted":
            core.delete_namespaced_pod(pod, ns)
            kubelet.stop(ns, pod)  # SIGTERM, as the kubelet stops a deleted pod's container
        else:
            core.delete_node(node)
            kubelet.stop(ns, pod, grace=0)  # the node's processes are gone with it
        last = max(last, trained_steps(kubelet.log(ns, pod))[-1])
        interruptions.append((how, newest, last))
        try:
            uid = running_pod(core, ns, pod, not_uid=uid)  # after a lost node, once podgc has removed the pod
        finally:
            if how == "node lost":
                cluster.kubectl("apply", "-f", str(cluster.state_dir / "nodes.yaml"))
        if how == "node lost":
            assert core.read_namespaced_pod(pod, ns).spec.node_name != node
        kubelet.start(ns, pod, pod_ip="127.0.0.1")

        def restart_counted(count: int = len(interruptions)) -> dict[str, Any] | None:
            entry = ((get(admin_api, FTJ, ns, name) or {}).get("status") or {}).get("stages", [{}])[0]
            checkpoint = (entry.get("lastCheckpoint") or {}).get("uri", "")
            return entry if entry.get("state") == "Running" and entry.get("restarts") == count and \
                checkpoint.startswith(f"{out}/checkpoint-") else None
        shown = wait_for(f"the status to count the restart ({how}) while the stage runs", restart_counted,
                         timeout=120, interval=0.2)
        assert shown["lastRestartTime"]
    assert kubelet.wait(ns, pod, timeout=600) == 0, kubelet.log(ns, pod)[-3000:]

    # each replacement fetched the newest checkpoint on s3, resumed there, and redid at most one interval
    attempts = kubelet.log(ns, pod).split("===== replacement pod uid=")
    assert len(attempts) == 3
    for (how, checkpoint, last), attempt in zip(interruptions, attempts[1:], strict=True):
        assert f"Fetched checkpoint uri={out}/checkpoint-{checkpoint} step={checkpoint}" in attempt, attempt[-3000:]
        assert re.search(rf"Resuming from checkpoint path=\S*/checkpoint-{checkpoint}\b", attempt)
        assert trained_steps(attempt)[0] == checkpoint + 1
        print(f"{how} after step {last}: resumed from checkpoint-{checkpoint} on s3, {last - checkpoint} steps redone")
        assert 0 < last - checkpoint <= SAVE_STEPS

    # the second stage starts from the first one's model on s3
    sft_pod = f"{name}-sft-master-0"
    running_pod(core, ns, sft_pod)
    kubelet.start(ns, sft_pod, pod_ip="127.0.0.1")
    assert kubelet.wait(ns, sft_pod, timeout=600) == 0, kubelet.log(ns, sft_pod)[-3000:]
    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", ns, f"ftj/{name}", "--timeout=60s", timeout=90)
    sft_run = json.loads(core.read_namespaced_config_map(f"{name}-sft", ns).data["stagerun.json"])
    assert sft_run["modelUri"] == out
    assert {"model.safetensors", "tokenizer.json", "metrics.json"} <= set(s3.keys(out))
    assert {"adapter_model.safetensors", "metrics.json", "checkpoint-20/trainer_state.json"} <= \
        set(s3.keys(f"{prefix}/{name}/sft"))

    # the status names the s3 outputs and counts both restarts
    job = get(admin_api, FTJ, ns, name) or {}
    pretrain, sft = job["status"]["stages"]
    assert (pretrain["state"], sft["state"]) == ("Succeeded", "Succeeded")
    assert pretrain["outputUri"] == out and pretrain["lastCheckpoint"]["uri"].startswith(f"{out}/checkpoint-")
    assert (pretrain["restarts"], sft["restarts"]) == (2, 0)  # the deleted pod and the lost node

    # the model is the one an uninterrupted run makes (same data, seed and steps): the held-out loss, and the
    # weights bit for bit (one CPU process is deterministic, and the checkpoint on s3 carries the RNG states)
    apply(cluster, s3_pipeline("s3-steady", prefix, stages=1), namespace=ns)
    steady_pod, steady_out = "s3-steady-pretrain-master-0", f"{prefix}/s3-steady/pretrain"
    running_pod(core, ns, steady_pod)
    kubelet.start(ns, steady_pod, pod_ip="127.0.0.1")
    assert kubelet.wait(ns, steady_pod, timeout=600) == 0, kubelet.log(ns, steady_pod)[-3000:]
    fs = s3.fs()
    ours, theirs = (json.loads(fs.cat_file(f"{o}/metrics.json")) for o in (out, steady_out))
    assert ours["globalStep"] == theirs["globalStep"] == MAX_STEPS
    assert ours["metrics"]["evalLoss"] == pytest.approx(theirs["metrics"]["evalLoss"], rel=1e-6)
    for o, local in ((out, tmp_path / "ours.safetensors"), (steady_out, tmp_path / "theirs.safetensors")):
        fs.get_file(f"{o}/model.safetensors", str(local))
    a, b = load_file(str(tmp_path / "ours.safetensors")), load_file(str(tmp_path / "theirs.safetensors"))
    assert a.keys() == b.keys()
    largest = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"held-out loss {ours['metrics']['evalLoss']:.6f} interrupted twice vs {theirs['metrics']['evalLoss']:.6f} "
          f"uninterrupted; weights differ by at most {largest:.3g}")
    assert largest == 0.0

    # the keys are nowhere the operator, the trainer or the API server's objects show
    shown = [kubelet.log(ns, pod), kubelet.log(ns, sft_pod), running_operator.log_text(), json.dumps(job),
             json.dumps(get(admin_api, PYTORCHJOBS, ns, f"{name}-pretrain")),
             *(str(e.message) for e in events(admin_api, ns, name))]
    for text in shown:
        assert s3.secret_key not in text and s3.access_key not in text
