"""`kubetune operator` against the real API server: pipelines of PyTorchJobs chained by conditions.

    .venv/bin/python -m pytest e2e/operator/test_e2e_operator_pipeline.py

KWOK completes (or, when asked, fails) each stage's pods; the training-operator turns that into
PyTorchJob conditions; the operator moves the FineTuneJob on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kopf
import pytest
from kubernetes import client

from e2e.conftest import REPO, Cluster, wait_for
from e2e.operator.conftest import (
    ADAPTERS,
    FTJ,
    PYTORCHJOBS,
    Operator,
    apply,
    condition,
    events,
    finetunejob,
    get,
    items,
    pod_annotations,
    stage,
)

THREE_STAGES = [
    stage("pretrain", "pretrain", "pvc://data/pretrain.jsonl", "text"),
    stage("sft", "sft", "pvc://data/sft.jsonl", "messages", tuning={"method": "lora"}),
    stage("dpo", "dpo", "pvc://data/prefs.jsonl", "preference", tuning={"method": "lora"}),
]


def jobs_of(api: client.ApiClient, namespace: str, job: str) -> list[dict[str, Any]]:
    return [p for p in items(api, PYTORCHJOBS, namespace)
            if (p["metadata"].get("labels") or {}).get("kubetune.io/finetunejob") == job]  # (not only ours here)


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, have), v in metrics.items() if n == name and set(labels.items()) <= set(have))


def test_three_stages_run_in_order_and_the_job_succeeds(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    # The namespace enforces PodSecurity "restricted": pods that break it are never created.
    before = running_operator.metrics()
    apply(cluster, finetunejob("pipe", THREE_STAGES, publish={"gpus": 1}), namespace=namespace)

    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", namespace, "ftj/pipe", "--timeout=180s", timeout=200)

    job = get(admin_api, FTJ, namespace, "pipe")
    assert job is not None
    status = job["status"]
    assert [(s["name"], s["state"], s["jobName"]) for s in status["stages"]] == [
        ("pretrain", "Succeeded", "pipe-pretrain"), ("sft", "Succeeded", "pipe-sft"), ("dpo", "Succeeded", "pipe-dpo")]
    for earlier, later in zip(status["stages"], status["stages"][1:]):
        assert earlier["completionTime"] <= later["startTime"], "a stage started before the one before it ended"
    assert status["stages"][2]["outputUri"] == "pvc://models/pipe/dpo"
    assert (status["currentStage"], status["progress"], status["observedGeneration"]) == ("dpo", "3/3", 1)
    assert {t: condition(job, t)["status"] for t in ("Accepted", "Succeeded", "Failed", "Ready", "Running",
                                                      "Reconciling", "Stalled")} == {
        "Accepted": "True", "Succeeded": "True", "Failed": "False", "Ready": "True", "Running": "False",
        "Reconciling": "False", "Stalled": "False"}
    pytorchjobs = jobs_of(admin_api, namespace, "pipe")
    assert sorted(p["metadata"]["name"] for p in pytorchjobs) == ["pipe-dpo", "pipe-pretrain", "pipe-sft"]
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"] for p in pytorchjobs)
    # each stage starts from the previous one's output (its merged weights after LoRA)
    runs = {name: json.loads(client.CoreV1Api(admin_api).read_namespaced_config_map(f"pipe-{name}", namespace)
                             .data["stagerun.json"]) for name in ("pretrain", "sft", "dpo")}
    assert runs["sft"]["modelUri"] == "pvc://models/pipe/pretrain"
    assert runs["dpo"]["modelUri"] == runs["dpo"]["referenceModelUri"] == "pvc://models/pipe/sft/merged"
    # the story, told by Events
    story = [(e.reason, e.message) for e in events(admin_api, namespace, "pipe")]
    created = [m for r, m in story if r == "Created"]
    assert created == [f"Created PyTorchJob pipe-{s} for stage {i}/3 {s}." for i, s in
                       ((1, "pretrain"), (2, "sft"), (3, "dpo"))]
    assert [m.split(" succeeded")[0] for r, m in story if r == "StageSucceeded"] == [
        "Stage 1/3 pretrain", "Stage 2/3 sft", "Stage 3/3 dpo"]
    assert ("Succeeded", "All 3 stages succeeded.") in story
    # printer columns
    table = cluster.kubectl("get", "ftj", "pipe", "-n", namespace).stdout
    assert "dpo" in table and "3/3" in table and "True" in table
    # published: a ModelAdapter for the last LoRA adapter on the previous stage's merged model
    adapter = get(admin_api, ADAPTERS, namespace, "pipe")
    assert adapter is not None and status["adapter"] == "pipe"
    assert adapter["spec"]["adapterUri"] == "pvc://models/pipe/dpo"
    assert adapter["spec"]["baseModelUri"] == "pvc://models/pipe/sft/merged"
    # metrics moved
    after = running_operator.metrics()
    for type_ in ("pretrain", "sft", "dpo"):
        assert sample(after, "kubetune_pytorchjobs_created_total", type=type_) == \
            sample(before, "kubetune_pytorchjobs_created_total", type=type_) + 1
        assert sample(after, "kubetune_stage_duration_seconds_count", type=type_, result="succeeded") == \
            sample(before, "kubetune_stage_duration_seconds_count", type=type_, result="succeeded") + 1
    assert sample(after, "kubetune_reconciles_total", kind="FineTuneJob", result="success") > \
        sample(before, "kubetune_reconciles_total", kind="FineTuneJob", result="success")
    assert sample(after, "kubetune_finetunejobs", condition="Succeeded") >= 1
    assert sample(after, "kubetune_reconcile_duration_seconds_count", kind="FineTuneJob") > 0


def test_a_stage_whose_pod_fails_fails_the_job_and_nothing_after_it_runs(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    body = finetunejob("broken", THREE_STAGES, annotations=pod_annotations({"kwok.kubetune.io/fail": "true"}, "sft"))
    apply(cluster, body, namespace=namespace)

    cluster.kubectl("wait", "--for=condition=Failed", "-n", namespace, "ftj/broken", "--timeout=120s", timeout=150)

    job = get(admin_api, FTJ, namespace, "broken")
    failed, succeeded = condition(job, "Failed"), condition(job, "Succeeded")
    assert (failed["status"], failed["reason"]) == ("True", "StageFailed")
    assert (succeeded["status"], succeeded["reason"]) == ("False", "StageFailed")
    assert failed["message"].startswith("Stage 2/3 sft failed: ")
    assert "exited with code 1" in failed["message"]
    assert "failed on purpose (kwok.kubetune.io/fail)" in failed["message"]
    assert f"kubectl logs -n {namespace} broken-sft-" in failed["message"]
    assert condition(job, "Stalled")["status"] == "True"
    assert [s["state"] for s in job["status"]["stages"]] == ["Succeeded", "Failed", "Pending"]
    assert sorted(p["metadata"]["name"] for p in jobs_of(admin_api, namespace, "broken")) == [
        "broken-pretrain", "broken-sft"]
    warnings = [e for e in events(admin_api, namespace, "broken") if e.type == "Warning"]
    assert [e.reason for e in warnings] == ["StageFailed"]


def test_a_spec_the_cluster_cannot_run_is_not_accepted_and_nothing_is_created(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    body = finetunejob("local", [stage("sft", "sft", "file:///data/chat.jsonl", "messages")],
                       output={"uri": "file:///tmp/out"})
    apply(cluster, body, namespace=namespace)

    job = wait_for("Accepted=False", lambda: (j := get(admin_api, FTJ, namespace, "local"))
                   and condition(j, "Accepted").get("status") == "False" and j, timeout=60)

    accepted = condition(job, "Accepted")
    assert accepted["reason"] == "InvalidSpec"
    assert "spec.output.uri: file:///tmp/out is not shared storage" in accepted["message"]
    assert "spec.stages[0].dataset.uri: file:///data/chat.jsonl is a path on one machine" in accepted["message"]
    assert condition(job, "Failed")["status"] == "True"
    assert jobs_of(admin_api, namespace, "local") == []
    assert any(e.reason == "InvalidSpec" and e.type == "Warning" for e in events(admin_api, namespace, "local"))


def test_suspend_holds_the_pipeline_and_resuming_runs_it(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    apply(cluster, finetunejob("held", THREE_STAGES[:2], runPolicy={"suspend": True}), namespace=namespace)
    job = wait_for("Suspended=True", lambda: (j := get(admin_api, FTJ, namespace, "held"))
                   and condition(j, "Suspended").get("status") == "True" and j, timeout=60)
    assert jobs_of(admin_api, namespace, "held") == []
    assert condition(job, "Reconciling")["status"] == "False"

    cluster.kubectl("patch", "ftj", "held", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":false}}}')

    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", namespace, "ftj/held", "--timeout=120s", timeout=150)
    job = get(admin_api, FTJ, namespace, "held")
    assert condition(job, "Suspended")["status"] == "False"
    assert job["status"]["observedGeneration"] == 2
    reasons = [e.reason for e in events(admin_api, namespace, "held")]
    assert reasons.index("Suspended") < reasons.index("Resumed") < reasons.index("Succeeded")


def test_suspending_a_running_stage_suspends_its_pytorchjob(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    slow = pod_annotations({"kwok.kubetune.io/delay": "10m"})
    apply(cluster, finetunejob("pausable", THREE_STAGES[:1], annotations=slow), namespace=namespace)
    wait_for("the stage to run", lambda: condition(get(admin_api, FTJ, namespace, "pausable"), "Running")
             .get("status") == "True", timeout=60)

    cluster.kubectl("patch", "ftj", "pausable", "-n", namespace, "--type=merge", "-p",
                    '{"spec":{"runPolicy":{"suspend":true}}}')

    pj = wait_for("the PyTorchJob to be suspended", lambda: (p := get(admin_api, PYTORCHJOBS, namespace, "pausable-pretrain"))
                  and condition(p, "Suspended").get("status") == "True" and p, timeout=60)
    assert pj["spec"]["runPolicy"]["suspend"] is True
    job = wait_for("the job to say so", lambda: (j := get(admin_api, FTJ, namespace, "pausable"))
                   and j["status"]["stages"][0]["state"] == "Suspended" and j, timeout=60)
    assert condition(job, "Suspended")["status"] == "True"
    assert condition(job, "Running")["status"] == "False"


def test_deleting_the_job_deletes_what_it_created(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    slow = pod_annotations({"kwok.kubetune.io/delay": "10m"})
    apply(cluster, finetunejob("gone", THREE_STAGES[:1], annotations=slow), namespace=namespace)
    wait_for("the PyTorchJob", lambda: get(admin_api, PYTORCHJOBS, namespace, "gone-pretrain"), timeout=60)

    cluster.kubectl("delete", "ftj", "gone", "-n", namespace, "--timeout=60s")

    wait_for("the PyTorchJob to go", lambda: get(admin_api, PYTORCHJOBS, namespace, "gone-pretrain") is None, timeout=60)
    configmaps = client.CoreV1Api(admin_api).list_namespaced_config_map(
        namespace, label_selector="kubetune.io/finetunejob=gone").items
    assert configmaps == []
    assert get(admin_api, FTJ, namespace, "gone") is None


def test_deleting_a_running_stages_pytorchjob_stops_the_job_instead_of_rerunning_the_stage(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    slow = pod_annotations({"kwok.kubetune.io/delay": "10m"})
    apply(cluster, finetunejob("stopped", THREE_STAGES[:2], annotations=slow), namespace=namespace)
    wait_for("the first stage to run", lambda: (j := get(admin_api, FTJ, namespace, "stopped"))
             and condition(j, "Running").get("status") == "True", timeout=60)

    cluster.kubectl("delete", "pytorchjob", "stopped-pretrain", "-n", namespace, "--wait=true", "--timeout=60s")

    cluster.kubectl("wait", "--for=condition=Failed", "-n", namespace, "ftj/stopped", "--timeout=60s", timeout=90)
    job = get(admin_api, FTJ, namespace, "stopped") or {}
    assert condition(job, "Failed")["reason"] == "StageDeleted"
    assert "PyTorchJob stopped-pretrain was deleted before the stage's result was recorded" in (
        condition(job, "Failed")["message"])
    assert get(admin_api, PYTORCHJOBS, namespace, "stopped-pretrain") is None, "the deleted stage was created again"
    assert [s["state"] for s in job["status"]["stages"]] == ["Failed", "Pending"]


def test_a_status_write_from_a_stale_read_is_refused_so_the_reconcile_runs_again(
    cluster: Cluster, admin_api: client.ApiClient, operator: Operator, namespace: str
) -> None:
    """Two replicas during a peering hand-over both read the job, then both write its status: the
    second write carries a resourceVersion the first one moved on, and the API server refuses it.
    The package's operator is stopped meanwhile (later tests start it again): its own status writes
    would move the resourceVersion under the first writer too."""
    from kubetune.controllers import common

    operator.stop()
    apply(cluster, finetunejob("contested", THREE_STAGES[:1]), namespace=namespace)
    first, second = (get(admin_api, FTJ, namespace, "contested") or {} for _ in range(2))
    saved, common.RUNTIME.api = common.RUNTIME.api, admin_api
    try:
        common.patch_status(FTJ, first, {"progress": "written by the first"})
        with pytest.raises(kopf.TemporaryError, match="changed since it was read"):
            common.patch_status(FTJ, second, {"progress": "written by the second"})
        common.patch_status(FTJ, first, {"currentStage": "pretrain"})  # its own next write goes through
    finally:
        common.RUNTIME.api = saved

    status = (get(admin_api, FTJ, namespace, "contested") or {})["status"]
    assert (status["progress"], status["currentStage"]) == ("written by the first", "pretrain")


def test_a_foreign_pytorchjob_of_the_stages_name_fails_the_job_and_is_left_alone(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    """A 409 is not taken as "ours" without looking at the owner: the stage would wait forever on
    someone else's PyTorchJob."""
    foreign = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "taken-pretrain"},
               "spec": {"runPolicy": {"suspend": True}, "pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {
                   "spec": {"containers": [{"name": "pytorch", "image": "someone/else"}]}}}}}}
    apply(cluster, foreign, namespace=namespace)
    apply(cluster, finetunejob("taken", THREE_STAGES[:1]), namespace=namespace)

    cluster.kubectl("wait", "--for=condition=Failed", "-n", namespace, "ftj/taken", "--timeout=60s", timeout=90)

    failed = condition(get(admin_api, FTJ, namespace, "taken") or {}, "Failed")
    assert failed["reason"] == "NameConflict"
    assert f"PyTorchJob taken-pretrain already exists in namespace {namespace} and belongs to something else" in failed["message"]
    theirs = get(admin_api, PYTORCHJOBS, namespace, "taken-pretrain") or {}
    assert "ownerReferences" not in theirs["metadata"]
    assert theirs["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"] == "someone/else"


def test_a_foreign_modeladapter_of_the_same_name_is_not_reported_as_the_jobs(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    theirs = {"apiVersion": "kubetune.io/v1alpha1", "kind": "ModelAdapter", "metadata": {"name": "held"},
              "spec": {"baseModelUri": "hf://someone/else", "adapterUri": "pvc://models/someone-else"}}
    apply(cluster, theirs, namespace=namespace)
    apply(cluster, finetunejob("publisher", THREE_STAGES[:2], publish={"gpus": 1, "adapterName": "held"}),
          namespace=namespace)

    cluster.kubectl("wait", "--for=condition=Succeeded", "-n", namespace, "ftj/publisher", "--timeout=120s", timeout=150)
    conflict = wait_for("a NameConflict event", lambda: [
        e for e in events(admin_api, namespace, "publisher") if e.reason == "NameConflict"], timeout=30)

    assert conflict[0].type == "Warning" and "ModelAdapter held already exists and belongs to something else" in (
        conflict[0].message)
    assert "adapter" not in (get(admin_api, FTJ, namespace, "publisher") or {})["status"]
    adapter = get(admin_api, ADAPTERS, namespace, "held") or {}
    assert adapter["spec"]["baseModelUri"] == "hf://someone/else" and "ownerReferences" not in adapter["metadata"]


# --- the API server refuses bad manifests with the CRD's messages ---------------------------

INVALID = REPO / "tests" / "api" / "invalid"


def _expectation(path: Path) -> tuple[str, str]:
    first = path.read_text().splitlines()[0]
    where, _, message = first.removeprefix("# expect:").partition("::")
    return where.strip(), message.strip()


# The manifests of tests/api/invalid that the CRD itself must refuse, and by which part: the
# OpenAPI schema, or a CEL rule (whose message is checked word for word). A fixed list, not one
# computed by kubetune's offline validator, so a regression there cannot shrink it unnoticed.
# (The others are refused by the operator's checks, or are not kubetune's kinds at all.)
SCHEMA_REFUSES = [
    "bad-memory-quantity", "bad-output-uri", "bad-toleration-operator", "batch-size-zero", "dpo-beta-zero",
    "lora-dropout-too-high", "lora-rank-zero", "model-uri-scheme", "negative-backoff", "negative-learning-rate",
    "no-stages", "prefds-split-too-big", "prefds-unknown-schema", "stage-name-not-dns", "stage-name-too-long",
    "too-many-gpus", "unknown-architecture", "unknown-dpo-loss", "unknown-format", "unknown-hyperparameter",
    "unknown-queue-provider", "unknown-spec-field", "unknown-stage-type", "unknown-tuning-method",
    "vocab-too-small", "zero-stage-four",
]
CEL_REFUSES = [
    "adapter-both-uris", "adapter-without-base", "dataset-missing-format", "dataset-uri-and-ref", "dpo-block-on-sft",
    "duplicate-stage-names", "format-does-not-suit-type", "lora-with-full", "model-neither-uri-nor-init",
    "model-uri-and-init", "offload-without-zero", "preference-ref-on-sft", "tokenizer-neither",
    "prompt-tuning-on-dpo", "publish-prefix-tuning", "ia3-feedforward-not-targeted",
    "prompt-block-with-lora", "vit-image-size-not-patches", "convnext-too-many-stages", "publish-image-classifier",
    "clip-image-size-not-patches",
]
REFUSED = [(INVALID / f"{name}.yaml", "schema") for name in SCHEMA_REFUSES] + [
    (INVALID / f"{name}.yaml", "cel") for name in CEL_REFUSES]


@pytest.mark.parametrize(("path", "check"), REFUSED, ids=[p.stem for p, _ in REFUSED])
def test_the_api_server_refuses_a_bad_manifest_saying_what_is_wrong(
    cluster: Cluster, namespace: str, path: Path, check: str
) -> None:
    where, message = _expectation(path)  # (a file missing from tests/api/invalid fails here)

    proc = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)

    assert proc.returncode != 0, f"{path.name} was accepted"
    if check == "cel":  # the rule's own message, written once in kubetune.api
        assert message in proc.stderr
    else:  # the OpenAPI schema: the API server's words, naming the field
        assert where in proc.stderr or message in proc.stderr, proc.stderr


def test_a_stage_whose_pods_cannot_be_scheduled_says_why(
    cluster: Cluster, admin_api: client.ApiClient, running_operator: Operator, namespace: str
) -> None:
    huge = stage("pretrain", "pretrain", "pvc://data/pretrain.jsonl", "text", resources={"gpusPerNode": 16})
    apply(cluster, finetunejob("too-big", [huge]), namespace=namespace)

    running = wait_for("the reason in the Running condition", lambda: "unschedulable" in (
        c := condition(get(admin_api, FTJ, namespace, "too-big"), "Running")).get("message", "") and c, timeout=60)

    assert running["status"] == "False" and running["reason"] == "StageCreated"
    assert running["message"].startswith("Stage 1/1 pretrain waits for its pods (PyTorchJob too-big-pretrain): "
                                         "pod too-big-pretrain-master-0 is unschedulable:")
    assert "Insufficient nvidia.com/gpu" in running["message"]
    cluster.kubectl("delete", "ftj", "too-big", "-n", namespace)
