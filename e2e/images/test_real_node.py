"""Stages run as real pods: the trainer image on a real kubelet node of the local cluster.

    make test-images

e2e/node.py starts the node (Debian's containerd, the kubelet built from the control plane's
Kubernetes module, a CNI bridge, CoreDNS as the cluster's DNS) beside the KWOK nodes, and imports
the trainer image `make images` built into its containerd. The operator runs from this checkout's
virtualenv under the chart's RBAC, as in e2e/operator, with the trainer image's reference and
`imagePullPolicy: Never`. No stand-in kubelet runs here: every pod below is scheduled by the
scheduler, started by the kubelet in containerd (runc, PodSecurity "restricted": uid 1000,
read-only root filesystem, no capabilities), writes its output to its PersistentVolumeClaim (a
hostPath PersistentVolume on this machine), and its status is the kubelet's.

- one node: the demo's pretrain stage succeeds on the real node and its model learned;
- two nodes: master and worker pods, each in its own network namespace, find each other through
  the master's Service (the training-operator's init container waits until CoreDNS resolves it)
  and train together over gloo;
- a trainer pod deleted mid-stage is created again by the training-operator and resumes from its
  newest checkpoint on the claim.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune.backends.pytorchjob import CONTAINER

from e2e.conftest import Cluster, fresh_namespace, wait_for
from e2e.images.conftest import UID_TRAINER, image, podman_flags
from e2e.node import NODE_IMAGE, POD_SUBNET, TOLERATION, RealNode, node_tools_dir
from e2e.operator.conftest import (  # noqa: F401  (fixtures)
    FTJ, Operator, _cleanup_pvs, bound_pvc, finetunejob, get, operator_crds, operator_kubeconfig, run_operator,
    running_operator, running_pod,
)

MODEL = {"init": {"architecture": "llama", "hiddenSize": 64, "numLayers": 2, "numHeads": 4,
                  "maxPositionEmbeddings": 128, "tokenizer": {"train": {"vocabSize": 400}}}}
DATASET = {"uri": "pvc://data/tiny/pretrain/train.jsonl", "format": "text",
           "validationUri": "pvc://data/tiny/pretrain/validation.jsonl"}


@pytest.fixture(scope="module")
def node(cluster: Cluster, admin_api: client.ApiClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    if os.geteuid() != 0:
        pytest.fail("the real node needs root (containerd, the kubelet's mounts, a network interface)")
    real = RealNode(cluster, admin_api, tmp_path_factory.mktemp("node"), node_tools_dir())
    try:
        real.start([image("trainer")], podman_flags())
        yield real
    finally:
        real.stop()
        print(f"node logs: {real.root}")


class NodeOperator(Operator):
    """The e2e operator, its trainer pods made from the trainer image that `make images` built."""

    def operator_args(self) -> list[str]:
        args = super().operator_args()
        args[args.index("--trainer-image") + 1] = image("trainer")
        return args


@pytest.fixture(scope="module")
def operator(cluster: Cluster, operator_kubeconfig: Path, node: RealNode,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    yield from run_operator(NodeOperator(cluster, operator_kubeconfig, tmp_path_factory.mktemp("operator")))


@pytest.fixture(scope="module")
def workspace(admin_api: client.ApiClient, operator_crds: None, node: RealNode,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A namespace enforcing PodSecurity "restricted" with claims `models` and `data` bound to
    hostPath volumes on this machine, owned by the trainer's user (what fsGroup does for a volume
    that supports it; hostPath does not), and the demo's generated data in `data`."""
    name = f"real-node-{uuid.uuid4().hex[:5]}"
    root = tmp_path_factory.mktemp("pvc")
    subprocess.run([sys.executable, "-m", "kubetune_trainer.data.synthetic", "--out", str(root / "data" / "tiny")],
                   check=True, capture_output=True)
    with fresh_namespace(admin_api, name, pod_security="restricted"):
        for claim in ("models", "data"):
            bound_pvc(admin_api, name, claim, root)
        for path in [root / "models", *(root / "data").rglob("*")]:
            os.chown(path, UID_TRAINER, UID_TRAINER)
        yield name, root


def pretraining(name: str, node: RealNode, nodes: int, **hyperparameters: Any) -> dict[str, Any]:
    """A one-stage job pretraining a tiny Llama on CPU, on the real node alone."""
    stage = {
        "name": "pretrain", "type": "pretrain", "dataset": DATASET,
        "hyperparameters": {"maxSteps": 60, "batchSize": 8, "maxLength": 64, "learningRate": 3.0e-3,
                            "loggingSteps": 1, **hyperparameters},
        "resources": {"nodes": nodes, "gpusPerNode": 0, "shmSize": "256Mi",
                      "nodeSelector": {"kubernetes.io/hostname": node.name}, "tolerations": [TOLERATION]},
    }
    body = finetunejob(name, [stage])
    body["spec"]["model"] = MODEL
    return body


def not_failed(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    """FineTuneJob `name`; fails the test at once if the job failed."""
    job = get(api, FTJ, ns, name) or {}
    for c in (job.get("status") or {}).get("conditions") or []:
        if c["type"] == "Failed" and c["status"] == "True":
            pytest.fail(f"FineTuneJob {name} failed: {c}")
    return job


def succeeded(api: client.ApiClient, ns: str, name: str, timeout: float = 900) -> dict[str, Any]:
    """Wait for FineTuneJob `name` to succeed; fail at once if it failed."""
    def done() -> dict[str, Any] | None:
        job = not_failed(api, ns, name)
        conditions = (job.get("status") or {}).get("conditions") or []
        return job if any(c["type"] == "Succeeded" and c["status"] == "True" for c in conditions) else None
    return wait_for(f"FineTuneJob {name} to succeed", done, timeout=timeout, interval=2)


def train(api: client.ApiClient, cluster: Cluster, ns: str, body: dict[str, Any]) -> dict[str, Any]:
    """Apply FineTuneJob `body` and wait for it to succeed."""
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    return succeeded(api, ns, body["metadata"]["name"])


def stage_pods(core: client.CoreV1Api, ns: str, job: str) -> list[client.V1Pod]:
    return sorted(core.list_namespaced_pod(ns, label_selector=f"training.kubeflow.org/job-name={job}-pretrain").items,
                  key=lambda p: p.metadata.name)


def learned(root: Path, job: str, steps: int) -> tuple[float, float]:
    """The stage's held-out loss before and after training (metrics.json on the claim), which must
    have ended at `steps` and fallen by 30 % at least."""
    m = json.loads((root / "models" / job / "pretrain" / "metrics.json").read_text())
    before, after = float(m["before"]["evalLoss"]), float(m["after"]["evalLoss"])
    assert m["globalStep"] == steps and after < 0.7 * before, (m["globalStep"], before, after)
    return before, after


def ran_on_the_node(pod: client.V1Pod, node: RealNode, trainer_image: str) -> None:
    """The pod ran on the real node, in containerd, from the trainer image, with an address of the pod network."""
    assert pod.spec.node_name == node.name, (pod.metadata.name, pod.spec.node_name)
    (status,) = [s for s in pod.status.container_statuses if s.name == CONTAINER]
    assert status.container_id.startswith("containerd://"), status.container_id
    assert status.image == trainer_image and status.image_id, (status.image, status.image_id)
    assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(POD_SUBNET), pod.status.pod_ip


def test_a_one_node_stage_runs_in_the_trainer_image_on_the_real_node_and_learns(
    admin_api: client.ApiClient, cluster: Cluster, node: RealNode, running_operator: Operator,
    workspace: tuple[str, Path],
) -> None:
    ns, root = workspace
    core = client.CoreV1Api(admin_api)
    job = train(admin_api, cluster, ns, pretraining("one", node, nodes=1))

    (pod,) = stage_pods(core, ns, "one")
    ran_on_the_node(pod, node, image("trainer"))
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    log = node.pod_log(ns, pod.metadata.name, CONTAINER)
    assert re.search(r"Finished stage stage=pretrain step=60", log), log[-3000:]

    # what the container wrote through the claim, as the trainer's user, and what it learned
    out = root / "models" / "one" / "pretrain"
    assert {"config.json", "model.safetensors", "metrics.json"} <= {p.name for p in out.iterdir()}
    assert (out / "model.safetensors").stat().st_uid == UID_TRAINER
    before, after = learned(root, "one", 60)
    print(f"held-out loss {before:.3f} -> {after:.3f} on {node.name} (pod {pod.metadata.name}, {pod.status.pod_ip})")
    (entry,) = job["status"]["stages"]
    assert entry["state"] == "Succeeded" and entry["step"] == 60


def test_a_two_node_stage_trains_over_gloo_between_two_pods_that_find_each_other_by_dns(
    admin_api: client.ApiClient, cluster: Cluster, node: RealNode, running_operator: Operator,
    workspace: tuple[str, Path],
) -> None:
    ns, root = workspace
    core = client.CoreV1Api(admin_api)
    train(admin_api, cluster, ns, pretraining("two", node, nodes=2))

    master, worker = stage_pods(core, ns, "two")
    assert (master.metadata.name, worker.metadata.name) == ("two-pretrain-master-0", "two-pretrain-worker-0")
    for pod in (master, worker):
        ran_on_the_node(pod, node, image("trainer"))
    assert master.status.pod_ip != worker.status.pod_ip
    # the worker waited for the master's name in the training-operator's init container, run from the node's image
    (init,) = worker.status.init_container_statuses
    assert init.name == "init-pytorch" and init.image == NODE_IMAGE and init.state.terminated.exit_code == 0
    waited = node.pod_log(ns, worker.metadata.name, "init-pytorch")
    assert f"Name:\ttwo-pretrain-master-0.{ns}.svc.cluster.local" in waited or \
        re.search(rf"two-pretrain-master-0\.{ns}\.svc\.cluster\.local", waited), waited[-2000:]
    assert master.status.pod_ip in waited, waited[-2000:]
    # one gloo process group of two ranks, the worker rank 1 (only rank 0 logs at INFO), both ran to exit 0
    log = node.pod_log(ns, master.metadata.name, CONTAINER)
    assert "Joined process group backend=gloo rank=0 worldSize=2" in log, log[-3000:]
    assert re.search(r"Started stage job=two stage=pretrain .*worldSize=2", log), log[-3000:]
    for pod, rank in ((master, "0"), (worker, "1")):
        env = {e.name: e.value for e in pod.spec.containers[0].env or []}
        assert (env["MASTER_ADDR"], env["RANK"], env["WORLD_SIZE"]) == ("two-pretrain-master-0", rank, "2"), env
        assert pod.status.phase == "Succeeded" and pod.status.container_statuses[0].state.terminated.exit_code == 0
    before, after = learned(root, "two", 60)
    print(f"two pods ({master.status.pod_ip}, {worker.status.pod_ip}): held-out loss {before:.3f} -> {after:.3f}")


def complete_checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


def test_a_trainer_pod_deleted_mid_stage_is_created_again_and_resumes_from_its_checkpoint_on_the_claim(
    admin_api: client.ApiClient, cluster: Cluster, node: RealNode, running_operator: Operator,
    workspace: tuple[str, Path],
) -> None:
    ns, root = workspace
    core = client.CoreV1Api(admin_api)
    steps, every = 200, 20
    cluster.kubectl("apply", "-n", ns, "-f", "-",
                    input=json.dumps(pretraining("deleted", node, nodes=1, maxSteps=steps, saveSteps=every)))
    name, out = "deleted-pretrain-master-0", root / "models" / "deleted" / "pretrain"

    def mid_interval() -> tuple[str, int, int] | None:
        """(pod uid, newest complete checkpoint, step) once the trainer is a few steps past a checkpoint."""
        done = complete_checkpoints(out)
        try:
            step = int(json.loads((out / "progress.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return None
        if step >= steps - 2 * every:
            pytest.fail(f"the trainer got to step {step} before it could be deleted mid-stage")
        if not done or not (done[-1] + 3 <= step and step % every <= every // 2):
            return None
        pod = core.read_namespaced_pod(name, ns)
        return (pod.metadata.uid, done[-1], step) if pod.status.phase == "Running" else None
    first_uid, newest, step_at_delete = wait_for("the trainer to be a few steps past a checkpoint", mid_interval,
                                                 timeout=600, interval=0.1)
    first = core.read_namespaced_pod(name, ns)
    ran_on_the_node(first, node, image("trainer"))
    core.delete_namespaced_pod(name, ns)  # the default grace period: SIGTERM, as a drain or eviction would
    # (the kubelet removes a deleted pod's log with it: what it has trained so far is read now)
    first_log = node.pod_log(ns, name, CONTAINER, uid=first_uid)
    first_steps = [int(s) for s in re.findall(r"Trained step=(\d+)/", first_log)]
    assert first_steps and max(first_steps) >= newest, first_log[-3000:]

    # the training-operator creates it again (a trainer that exited 1 on SIGTERM would have failed the stage for good)
    running_pod(core, ns, name, not_uid=first_uid)
    job = succeeded(admin_api, ns, "deleted")

    second = core.read_namespaced_pod(name, ns)
    ran_on_the_node(second, node, image("trainer"))
    log = node.pod_log(ns, name, CONTAINER, uid=second.metadata.uid)
    resumed = re.search(r"Resuming from checkpoint path=\S*/checkpoint-(\d+)", log)
    assert resumed, log[-3000:]
    second_steps = [int(s) for s in re.findall(r"Trained step=(\d+)/", log)]
    resumed_from = int(resumed.group(1))
    print(f"deleted at step {step_at_delete} (newest checkpoint {newest}); the new pod {second.metadata.uid[:8]} "
          f"resumed from checkpoint-{resumed_from}, first step {min(second_steps)}")
    # the newest complete checkpoint: the one before the delete, or one written before SIGTERM reached the trainer
    assert newest <= resumed_from < steps and resumed_from % every == 0 and min(second_steps) == resumed_from + 1
    learned(root, "deleted", steps)
    (entry,) = job["status"]["stages"]
    assert entry["state"] == "Succeeded" and entry["step"] == steps
