"""The control plane fails under a three-stage pipeline: the operator SIGKILLed at ten moments
picked by a seeded schedule, then the API server and etcd restarted mid-pipeline. Each time no
stage's PyTorchJob is created twice, no stage result is lost and the job ends Succeeded.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_chaos.py -s   # prints the schedule
    KUBETUNE_CHAOS_SEED=7 .venv/bin/python -m pytest e2e/operator/test_e2e_operator_chaos.py

The stages' pods run on KWOK's fake nodes and are held Running until the test ends them (exit
0, as the stand-in kubelet reports a finished container), so every kill lands in a known phase
of a known stage: the ten points are the job just applied, and for each stage its PyTorchJob
just created, its pods running, and its pods just finished (the hand-off to the next stage).
The seed draws, for each point, how long after entering it the operator dies and how long it
stays down. The API server and etcd are killed (SIGKILL) and started again with the same
command line (etcd keeps its data), once after a minute's outage, longer than kopf retries a
request by default; nothing restarts the KWOK nodes, the scheduler or the
training-operator, which reconnect as they would to a restarted control plane.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client

from e2e.conftest import Cluster, wait_for
from e2e.operator.conftest import (
    FTJ,
    HOLD,
    PYTORCHJOBS,
    Kubelet,
    Operator,
    apply,
    events,
    finetunejob,
    get,
    pod_annotations,
    running_pod,
    stage,
)

SEED = int(os.environ.get("KUBETUNE_CHAOS_SEED", "20261130"))
NAMES = ("pretrain", "sft", "dpo")
STAGES = [
    stage("pretrain", "pretrain", "pvc://data/pretrain.jsonl", "text"),
    stage("sft", "sft", "pvc://data/sft.jsonl", "messages"),
    stage("dpo", "dpo", "pvc://data/prefs.jsonl", "preference"),
]


def pytorchjob(api: client.ApiClient, ns: str, job: str, name: str) -> dict[str, Any]:
    return wait_for(f"PyTorchJob {job}-{name}", lambda: get(api, PYTORCHJOBS, ns, f"{job}-{name}"), timeout=120)


def assert_pipeline_intact(api: client.ApiClient, ns: str, job: str, uids: dict[str, str]) -> None:
    """Succeeded, every stage Succeeded with its times and output, each PyTorchJob the one first seen."""
    body = get(api, FTJ, ns, job)
    assert body is not None
    stages = body["status"]["stages"]
    assert [(s["name"], s["state"]) for s in stages] == [(n, "Succeeded") for n in NAMES], stages
    assert all(s.get("startTime") and s.get("completionTime") for s in stages), stages
    assert [s.get("outputUri") for s in stages] == [f"pvc://models/{job}/{n}" for n in NAMES], stages
    assert body["status"]["progress"] == "3/3"
    for name, uid in uids.items():
        assert get(api, PYTORCHJOBS, ns, f"{job}-{name}")["metadata"]["uid"] == uid, \
            f"the {name} PyTorchJob was created again"
    created = [e.message for e in events(api, ns, job) if e.reason == "Created"]
    assert len(created) == len(set(created)), created  # best effort (see the restarts e2e); uids are the proof


def run_pipeline(cluster: Cluster, api: client.ApiClient, kubelet: Kubelet, ns: str, job: str,
                 fault: Callable[[str], None]) -> dict[str, str]:
    """Apply a three-stage job and walk it through its phases, calling fault(point) at each;
    the uid of each stage's PyTorchJob when first seen."""
    core = client.CoreV1Api(api)
    apply(cluster, finetunejob(job, STAGES, annotations=pod_annotations(HOLD)), namespace=ns)
    fault("applied")
    uids: dict[str, str] = {}
    for name in NAMES:
        uids[name] = pytorchjob(api, ns, job, name)["metadata"]["uid"]
        fault(f"{name}: PyTorchJob created")
        pod = f"{job}-{name}-master-0"
        running_pod(core, ns, pod)
        fault(f"{name}: pods running")
        kubelet.terminate(ns, pod, 0)
        fault(f"{name}: pods finished")
    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", ns, f"ftj/{job}", "--timeout=180s", timeout=200)
    return uids


def test_a_pipeline_survives_the_operator_killed_at_ten_seeded_points(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str, kubelet: Kubelet,
) -> None:
    rng = random.Random(SEED)
    kills: list[str] = []

    def kill(point: str) -> None:
        after, down = rng.uniform(0.0, 2.0), rng.uniform(0.0, 1.5)
        time.sleep(after)
        running_operator.kill()
        kills.append(f"{point} (+{after:.2f} s, down {down:.2f} s)")
        time.sleep(down)
        running_operator.start()

    print(f"\nchaos seed {SEED}")
    uids = run_pipeline(cluster, admin_api, kubelet, namespace, "chaos", kill)
    print("operator SIGKILLed at:\n  " + "\n  ".join(kills))

    assert len(set(kills)) >= 10
    assert_pipeline_intact(admin_api, namespace, "chaos", uids)


def test_a_pipeline_survives_the_api_server_and_etcd_restarting(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str, kubelet: Kubelet,
    tmp_path: Path,
) -> None:
    # (component, seconds down): one outage outlasts kopf's default retries (8, 54 s in all)
    restarts = {"pretrain: pods running": ("kube-apiserver", 2.0), "sft: PyTorchJob created": ("etcd", 2.0),
                "sft: pods finished": ("kube-apiserver", 60.0), "dpo: pods running": ("etcd", 2.0)}
    done: list[str] = []

    def restart(point: str) -> None:
        if point in restarts:
            started = time.monotonic()
            component, down = restarts[point]
            cluster.restart(component, down_seconds=down)
            done.append(f"{component} at {point}: API server ready again after {time.monotonic() - started:.0f} s")

    # An operator of this test's own (same identity and priority), whose log may hold the 403s an
    # API server answers while its RBAC cache fills after a restart: the package's operator fails
    # the run on any 403 in its log.
    running_operator.stop()
    operator = Operator(cluster, running_operator.kubeconfig, tmp_path)
    operator.start()
    try:
        uids = run_pipeline(cluster, admin_api, kubelet, namespace, "outage", restart)
        print("\n" + "\n".join(done))
        assert len(done) == len(restarts), done
        assert_pipeline_intact(admin_api, namespace, "outage", uids)
        assert operator.proc is not None and operator.proc.poll() is None, "the operator exited"
        refused = [line for line in operator.log_text().splitlines() if "is forbidden: User" in line]
        assert all("will retry" in line for line in refused), refused  # retried, never given up on
    finally:
        operator.stop()
        running_operator.ensure_running()
