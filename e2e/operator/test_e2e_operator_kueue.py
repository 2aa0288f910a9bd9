"""Queues for real: Kueue (built from its Go module, e2e/kueue.py) admits the stages of jobs with
`spec.runPolicy.queue`, from a ClusterQueue of 16 fake GPUs through a LocalQueue.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_kueue.py

1. Gang admission and quota: a two-node stage of 2 x 6 GPUs is admitted whole, both its pods at
   once. A second two-node stage of 2 x 4 GPUs does not fit the 4 GPUs left. The scheduler alone
   would place one of its pods on the fake nodes' free GPUs, but Kueue admits none of them. The
   job's status names the queue and gives Kueue's reason. The second job starts once the first
   one's quota is free. The pods of these stages are held Running by KWOK and ended by the test.
2. Suspend and resume through Kueue: a CPU stage trains for real (the stand-in kubelet). Setting
   `spec.runPolicy.suspend` deactivates its Workload. Kueue evicts it and suspends the PyTorchJob,
   and its pod goes. Resuming activates the Workload, Kueue admits it again, and the new pod
   resumes from the newest checkpoint on the claim.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from e2e.conftest import Cluster, wait_for
from e2e.kueue import Kueue
from e2e.operator.conftest import (
    FTJ,
    HOLD,
    PYTORCHJOBS,
    Kubelet,
    Operator,
    Workspace,
    apply,
    condition,
    finetunejob,
    get,
    pod_annotations,
    running_pod,
    stage,
)

WORKLOADS = ("kueue.x-k8s.io", "v1beta2", "workloads")
CLUSTER_QUEUE = "e2e-gpus"
QUEUE = "gpus"
SAVE_STEPS = 10


@pytest.fixture(scope="module")
def kueue(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    k = Kueue(cluster, tmp_path_factory.mktemp("kueue"))
    k.start()
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture
def queue(cluster: Cluster, kueue: Kueue, workspace: Workspace) -> Iterator[str]:
    """A ClusterQueue of 16 GPUs (and CPU and memory enough) with a LocalQueue in the test's namespace."""
    quota = [{"name": "cpu", "nominalQuota": "1000"}, {"name": "memory", "nominalQuota": "10Ti"},
             {"name": "nvidia.com/gpu", "nominalQuota": 16}]
    objects = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "kwok-gpu"}, "spec": {}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{
             "coveredResources": [q["name"] for q in quota], "flavors": [{"name": "kwok-gpu", "resources": quota}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
         "metadata": {"name": QUEUE, "namespace": workspace.namespace}, "spec": {"clusterQueue": CLUSTER_QUEUE}},
    ]
    apply(cluster, *objects, namespace=workspace.namespace)
    try:
        yield QUEUE
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "--wait=false", "-n", workspace.namespace, "localqueue", QUEUE)
        cluster.kubectl("delete", "--ignore-not-found", "clusterqueue", CLUSTER_QUEUE)


def gpu_job(name: str, gpus_per_node: int) -> dict[str, Any]:
    """A two-node stage on the fake GPU nodes, queued; its pods are held Running by KWOK."""
    body = finetunejob(name, [stage("train", "sft", "pvc://data/sft.jsonl", "promptCompletion",
                                    resources={"nodes": 2, "gpusPerNode": gpus_per_node})],
                       annotations=pod_annotations(HOLD), runPolicy={"queue": {"name": QUEUE}})
    return body


def pods_of(core: client.CoreV1Api, ns: str, job: str) -> list[str]:
    return sorted(p.metadata.name for p in core.list_namespaced_pod(ns).items if p.metadata.name.startswith(f"{job}-"))


def both_pods(core: client.CoreV1Api, ns: str, job: str) -> list[str] | None:
    """The master's and the worker's pod once both exist."""
    found = pods_of(core, ns, job)
    return found if len(found) == 2 else None


def workload(api: client.ApiClient, ns: str, pytorchjob: str) -> dict[str, Any] | None:
    pj = get(api, PYTORCHJOBS, ns, pytorchjob)
    if not pj:
        return None
    group, version, plural = WORKLOADS
    found = client.CustomObjectsApi(api).list_namespaced_custom_object(
        group, version, ns, plural, label_selector=f"kueue.x-k8s.io/job-uid={pj['metadata']['uid']}")["items"]
    return found[0] if found else None


def admitted(wl: dict[str, Any] | None) -> bool:
    return any(c["type"] == "Admitted" and c["status"] == "True" for c in ((wl or {}).get("status") or {}).get("conditions") or [])


def test_kueue_admits_a_multi_node_stage_whole_and_holds_one_over_quota_until_quota_frees(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, workspace: Workspace,
    kubelet: Kubelet, queue: str,
) -> None:
    ns, core = workspace.namespace, client.CoreV1Api(admin_api)
    apply(cluster, gpu_job("big", 6), namespace=ns)
    wait_for("Kueue to admit big's workload", lambda: admitted(workload(admin_api, ns, "big-train")), timeout=120)
    big_pods = wait_for("both of big's pods", lambda: both_pods(core, ns, "big-train"), timeout=120)
    assert big_pods == ["big-train-master-0", "big-train-worker-0"]
    for pod in big_pods:
        running_pod(core, ns, pod)

    apply(cluster, gpu_job("next", 4), namespace=ns)

    def queued_with_reason() -> dict[str, Any] | None:
        running = condition(get(admin_api, FTJ, ns, "next"), "Running")
        return running if "insufficient" in running.get("message", "") else None
    waiting = wait_for("next's status to say why it waits", queued_with_reason, timeout=120)
    print(f"next waits: {waiting['reason']}: {waiting['message']}")
    assert waiting["reason"] == "StageQueued" and waiting["status"] == "False"
    assert f"waits in Kueue LocalQueue {queue}" in waiting["message"] and "nvidia.com/gpu" in waiting["message"]
    pj = get(admin_api, PYTORCHJOBS, ns, "next-train") or {}
    assert pj["spec"]["runPolicy"]["suspend"] is True  # Kueue's webhook suspended it when it was created
    assert pods_of(core, ns, "next-train") == []  # gang: no pod of it, though a 4-GPU pod would fit a node
    stage_entry = (get(admin_api, FTJ, ns, "next") or {})["status"]["stages"][0]
    assert stage_entry["state"] == "Pending"

    # the first job ends; Kueue frees its quota and admits the second whole
    for pod in big_pods:
        kubelet.terminate(ns, pod, 0)
    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", ns, "ftj/big", "--timeout=120s", timeout=150)
    wait_for("Kueue to admit next's workload", lambda: admitted(workload(admin_api, ns, "next-train")), timeout=120)
    next_pods = wait_for("both of next's pods", lambda: both_pods(core, ns, "next-train"), timeout=120)
    for pod in next_pods:
        running_pod(core, ns, pod)
    wait_for("next to run", lambda: condition(get(admin_api, FTJ, ns, "next"), "Running").get("status") == "True",
             timeout=60)
    for pod in next_pods:
        kubelet.terminate(ns, pod, 0)
    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", ns, "ftj/next", "--timeout=120s", timeout=150)


def test_a_stage_suspended_and_resumed_through_kueue_resumes_from_its_checkpoint(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, workspace: Workspace,
    kubelet: Kubelet, queue: str,
) -> None:
    ns, root, core = workspace.namespace, workspace.pvc_root, client.CoreV1Api(admin_api)
    subprocess.run([sys.executable, "-m", "kubetune_trainer.data.synthetic", "--out", str(root / "data" / "tiny")],
                   check=True, capture_output=True)
    body = finetunejob("paused", [stage(
        "pretrain", "pretrain", "pvc://data/tiny/pretrain/train.jsonl", "text",
        resources={"nodes": 1, "gpusPerNode": 0},
        hyperparameters={"maxSteps": 150, "batchSize": 8, "maxLength": 64, "learningRate": 3.0e-3,
                         "loggingSteps": 1, "saveSteps": SAVE_STEPS, "packing": True},
    )], annotations=pod_annotations(HOLD), runPolicy={"queue": {"name": queue}})
    body["spec"]["model"] = {"init": {"architecture": "llama", "hiddenSize": 64, "numLayers": 2, "numHeads": 4,
                                      "maxPositionEmbeddings": 128, "tokenizer": {"train": {"vocabSize": 400}}}}
    apply(cluster, body, namespace=ns)
    pod, out = "paused-pretrain-master-0", root / "models" / "paused" / "pretrain"
    uid = running_pod(core, ns, pod)
    assert admitted(workload(admin_api, ns, "paused-pretrain"))
    kubelet.start(ns, pod, pod_ip="127.0.0.1")

    def steps() -> list[int]:
        return [int(s) for s in re.findall(r"Trained step=(\d+)/", kubelet.log(ns, pod))]

    def complete() -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    wait_for("a checkpoint and a few steps more", lambda: complete() and steps() and steps()[-1] >= complete()[-1] + 3,
             timeout=300, interval=0.1)

    cluster.kubectl("patch", "ftj", "paused", "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wl = wait_for("the operator to deactivate the Workload",
                  lambda: (w := workload(admin_api, ns, "paused-pretrain")) and w["spec"].get("active") is False and w,
                  timeout=60)
    assert wl["metadata"]["annotations"]["kubetune.io/deactivated-by"] == "spec.runPolicy.suspend"

    def pod_going() -> bool:
        try:
            return core.read_namespaced_pod(pod, ns).metadata.deletion_timestamp is not None
        except client.ApiException as e:
            return e.status == 404
    wait_for("Kueue to suspend the PyTorchJob and its pod to go", pod_going, timeout=120)
    kubelet.stop(ns, pod)  # as the kubelet stops a deleted pod's container
    newest, last = complete()[-1], steps()[-1]
    pj = get(admin_api, PYTORCHJOBS, ns, "paused-pretrain") or {}
    assert pj["spec"]["runPolicy"]["suspend"] is True
    wait_for("the job to show it is suspended",
             lambda: condition(get(admin_api, FTJ, ns, "paused"), "Suspended").get("status") == "True", timeout=60)
    assert (get(admin_api, FTJ, ns, "paused") or {})["status"]["stages"][0]["state"] == "Suspended"

    cluster.kubectl("patch", "ftj", "paused", "-n", ns, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')
    running_pod(core, ns, pod, not_uid=uid)
    wl = workload(admin_api, ns, "paused-pretrain") or {}
    assert wl["spec"].get("active") is not False and "kubetune.io/deactivated-by" not in \
        (wl["metadata"].get("annotations") or {})
    first = kubelet.log(ns, pod)
    kubelet.start(ns, pod, pod_ip="127.0.0.1")
    assert kubelet.wait(ns, pod, timeout=600) == 0, kubelet.log(ns, pod)[-3000:]
    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", ns, "ftj/paused", "--timeout=60s", timeout=90)

    second = kubelet.log(ns, pod)[len(first):]
    assert re.search(rf"Resuming from checkpoint path=\S*/checkpoint-{newest}\b", second), second[-3000:]
    first_after = min(int(s) for s in re.findall(r"Trained step=(\d+)/", second))
    print(f"suspended through Kueue after step {last}; resumed from checkpoint-{newest}: {last - newest} steps redone")
    assert first_after == newest + 1 and 0 <= last - newest <= SAVE_STEPS
