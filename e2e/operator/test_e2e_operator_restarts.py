"""The operator dies (SIGKILL) mid-pipeline and comes back; two replicas never both act.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_restarts.py
"""

from __future__ import annotations

import re
from pathlib import Path

from kubernetes import client

from e2e.conftest import Cluster, wait_for
from e2e.operator.conftest import (
    FTJ,
    PEERING,
    PYTORCHJOBS,
    Operator,
    apply,
    condition,
    events,
    finetunejob,
    get,
    pod_annotations,
    stage,
)

STAGES = [
    stage("pretrain", "pretrain", "pvc://data/pretrain.jsonl", "text"),
    stage("sft", "sft", "pvc://data/sft.jsonl", "messages"),
    stage("dpo", "dpo", "pvc://data/prefs.jsonl", "preference"),
]


def test_a_pipeline_survives_the_operator_being_killed_at_every_stage(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    apply(cluster, finetunejob("survivor", STAGES, annotations=pod_annotations({"kwok.kubetune.io/delay": "4s"})),
          namespace=namespace)
    uids: dict[str, str] = {}

    for name in ("pretrain", "sft", "dpo"):
        pj = wait_for(f"PyTorchJob survivor-{name}", lambda: get(admin_api, PYTORCHJOBS, namespace, f"survivor-{name}"),
                      timeout=90)
        uids[name] = pj["metadata"]["uid"]
        running_operator.kill()  # right after it created the stage: its status may not say so yet
        # the world moves on while no operator watches: the stage's pods finish, its PyTorchJob succeeds
        wait_for(f"PyTorchJob survivor-{name} to succeed unwatched", lambda: condition(
            get(admin_api, PYTORCHJOBS, namespace, f"survivor-{name}"), "Succeeded").get("status") == "True",
            timeout=90)
        running_operator.start()

    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", namespace, "ftj/survivor", "--timeout=120s", timeout=150)

    job = get(admin_api, FTJ, namespace, "survivor")
    assert job is not None
    stages = job["status"]["stages"]
    assert [(s["name"], s["state"]) for s in stages] == [("pretrain", "Succeeded"), ("sft", "Succeeded"),
                                                         ("dpo", "Succeeded")]
    assert all(s.get("startTime") and s.get("completionTime") for s in stages)
    assert job["status"]["progress"] == "3/3"
    for name, uid in uids.items():
        assert get(admin_api, PYTORCHJOBS, namespace, f"survivor-{name}")["metadata"]["uid"] == uid, \
            f"the {name} PyTorchJob was created again"
    # no stage was announced twice (kopf posts events after the handler, so a SIGKILL right after
    # a creation may lose that stage's event: events are best effort, the uids above are the proof)
    created = [e.message for e in events(admin_api, namespace, "survivor") if e.reason == "Created"]
    assert len(created) == len(set(created)) and created, created
    assert set(created) <= {f"Created PyTorchJob survivor-{s} for stage {i}/3 {s}."
                            for i, s in ((1, "pretrain"), (2, "sft"), (3, "dpo"))}
    assert running_operator.starts >= 4


def test_of_two_replicas_only_the_one_with_the_higher_priority_acts_and_the_other_takes_over(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str, tmp_path: Path
) -> None:
    standby = Operator(cluster, running_operator.kubeconfig, tmp_path, priority=50, identity="kubetune-e2e-standby")
    standby.start()
    try:
        # A peered replica starts paused and resumes only when no live peer outranks it.
        wait_for("both replicas in the peering", lambda: {"kubetune-e2e-operator", "kubetune-e2e-standby"} <= set(
            client.CustomObjectsApi(admin_api).get_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", PEERING).get("status") or {}), timeout=60)
        apply(cluster, finetunejob("leader", STAGES[:1]), namespace=namespace)
        cluster.kubectl("wait", "--for=condition=Succeeded", "-n", namespace, "ftj/leader", "--timeout=90s", timeout=120)
        assert "Created PyTorchJob name=leader-pretrain" in running_operator.log_text()
        # all the while the standby saw the peering and the job, and stayed paused
        assert "leader" not in standby.log_text()
        assert "Resuming operations" not in standby.log_text()

        running_operator.kill()
        apply(cluster, finetunejob("follower", STAGES[:1]), namespace=namespace)

        cluster.kubectl("wait", "--for=condition=Succeeded", "-n", namespace, "ftj/follower", "--timeout=120s",
                        timeout=150)
        assert "Resuming operations" in standby.log_text()
        assert re.search(r"Created PyTorchJob name=follower-pretrain", standby.log_text())
        assert condition(get(admin_api, FTJ, namespace, "follower"), "Ready")["status"] == "True"
    finally:
        running_operator.ensure_running()
        standby.stop()
