"""Acceptance tests of the local control plane: what kubetune's own e2e tests will rely on.

    .venv/bin/python -m pytest e2e/test_cluster.py

Real binaries, no mocks: the API server authenticates and authorizes, the scheduler places
pods on KWOK's fake GPU nodes, the training-operator runs PyTorchJobs, KWOK plays the pods.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from e2e.conftest import KWOK_TOLERATION, REPO, Cluster, wait_for

GPUS_PER_NODE = 8
KUBEFLOW = ("kubeflow.org", "v1", "pytorchjobs")


# --- nodes ----------------------------------------------------------------------------------


def test_kubectl_lists_fake_gpu_nodes(cluster: Cluster) -> None:
    table = cluster.kubectl("get", "nodes", "-l", "nvidia.com/gpu.present=true").stdout
    nodes = json.loads(cluster.kubectl("get", "nodes", "-l", "nvidia.com/gpu.present=true", "-o", "json").stdout)["items"]

    assert len(nodes) >= 1
    for node in nodes:
        name = node["metadata"]["name"]
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert name in table
        assert ready == "True", name
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(GPUS_PER_NODE), name
        assert {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"} in node["spec"]["taints"]


def test_kubectl_reports_the_built_version(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)

    assert version["serverVersion"]["gitVersion"].startswith("v1.34.")
    assert version["clientVersion"]["gitVersion"] == version["serverVersion"]["gitVersion"]


# --- PyTorchJob through the training-operator, scheduler and KWOK ----------------------------


def _pytorchjob(
    name: str, *, master_annotations: dict[str, str] | None = None, worker_annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    def replica(annotations: dict[str, str]) -> dict[str, Any]:
        return {
            "replicas": 1,
            "restartPolicy": "Never",
            "template": {
                "metadata": {"annotations": {"kwok.kubetune.io/delay": "3s", **annotations}},
                "spec": {
                    "tolerations": [KWOK_TOLERATION],
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "containers": [{
                        "name": "pytorch",
                        "image": "ghcr.io/kubetune/trainer:e2e",
                        "command": ["kubetune-train"],
                        "resources": {"limits": {"nvidia.com/gpu": GPUS_PER_NODE}},
                    }],
                },
            },
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {
                "Master": replica(master_annotations or {}),
                "Worker": replica(worker_annotations or {}),
            },
        },
    }


def _conditions(obj: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}


def _wait_for_condition(api: client.ApiClient, namespace: str, name: str, condition: str) -> dict[str, Any]:
    custom = client.CustomObjectsApi(api)

    def probe() -> dict[str, Any] | None:
        job = custom.get_namespaced_custom_object(*KUBEFLOW[:2], namespace, KUBEFLOW[2], name)
        return job if _conditions(job).get(condition) == "True" else None

    return wait_for(f"PyTorchJob {namespace}/{name} {condition}", probe, timeout=120)


def test_pytorchjob_runs_on_gpu_nodes_and_succeeds(admin_api: client.ApiClient, namespace: str) -> None:
    client.CustomObjectsApi(admin_api).create_namespaced_custom_object(
        *KUBEFLOW[:2], namespace, KUBEFLOW[2], _pytorchjob("train")
    )

    job = _wait_for_condition(admin_api, namespace, "train", "Succeeded")

    core = client.CoreV1Api(admin_api)
    # The job succeeds with its master; the worker, started a moment later, finishes its own run after.
    pods = wait_for("both pods to succeed", lambda: (items := core.list_namespaced_pod(
        namespace, label_selector="training.kubeflow.org/job-name=train").items) and len(items) == 2
        and all(p.status.phase == "Succeeded" for p in items) and items, timeout=60)
    services = core.list_namespaced_service(namespace, label_selector="training.kubeflow.org/job-name=train").items
    assert sorted(p.metadata.labels["training.kubeflow.org/replica-type"] for p in pods) == ["master", "worker"]
    nodes = {p.spec.node_name for p in pods}
    assert len(nodes) == 2, "8 GPUs each: the two pods cannot share a node"
    assert all(n and n.startswith("kwok-gpu-") for n in nodes)
    assert all(p.spec.containers[0].env and any(e.name == "PET_NNODES" for e in p.spec.containers[0].env) for p in pods)
    assert {s.metadata.name for s in services} == {"train-master-0", "train-worker-0"}
    assert {"Created", "Running", "Succeeded"} <= set(_conditions(job))
    assert job["status"]["replicaStatuses"]["Master"]["succeeded"] == 1


def test_pytorchjob_whose_pod_fails_fails(admin_api: client.ApiClient, namespace: str) -> None:
    client.CustomObjectsApi(admin_api).create_namespaced_custom_object(
        *KUBEFLOW[:2], namespace, KUBEFLOW[2],
        # The worker fails while the master still runs (a master that succeeds ends the job).
        _pytorchjob(
            "broken",
            master_annotations={"kwok.kubetune.io/delay": "60s"},
            worker_annotations={"kwok.kubetune.io/fail": "true", "kwok.kubetune.io/delay": "1s"},
        ),
    )

    job = _wait_for_condition(admin_api, namespace, "broken", "Failed")

    worker = client.CoreV1Api(admin_api).read_namespaced_pod("broken-worker-0", namespace)
    assert worker.status.phase == "Failed"
    assert worker.status.container_statuses[0].state.terminated.exit_code == 1
    assert _conditions(job).get("Succeeded") != "True"
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert "Worker replica(s) failed" in failed["message"]


# --- scheduling ------------------------------------------------------------------------------


def test_pod_asking_for_more_gpus_than_a_node_has_stays_pending(admin_api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(admin_api)
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-big"},
        "spec": {
            "tolerations": [KWOK_TOLERATION],
            "containers": [{
                "name": "pytorch", "image": "ghcr.io/kubetune/trainer:e2e",
                "resources": {"limits": {"nvidia.com/gpu": str(2 * GPUS_PER_NODE)}},
            }],
        },
    })

    def unschedulable() -> client.V1PodCondition | None:
        pod = core.read_namespaced_pod("too-big", namespace)
        return next((c for c in pod.status.conditions or [] if c.type == "PodScheduled" and c.status == "False"), None)

    condition = wait_for("the scheduler to give up on pod too-big", unschedulable, timeout=60)
    pod = core.read_namespaced_pod("too-big", namespace)
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=too-big").items
    assert condition.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in condition.message
    assert pod.status.phase == "Pending" and not pod.spec.node_name
    assert any(e.reason == "FailedScheduling" and "Insufficient nvidia.com/gpu" in e.message for e in events)


# --- authentication, authorization, admission --------------------------------------------------


def test_service_account_without_rights_is_forbidden(
    cluster: Cluster, admin_api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(admin_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})

    with cluster.service_account_client(namespace, "nobody") as api:
        with pytest.raises(client.ApiException) as refused:
            client.CoreV1Api(api).list_namespaced_pod(namespace)

    assert refused.value.status == 403
    assert f"system:serviceaccount:{namespace}:nobody" in refused.value.body


def test_service_account_gets_what_a_role_grants(
    cluster: Cluster, admin_api: client.ApiClient, namespace: str
) -> None:
    client.CoreV1Api(admin_api).create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac = client.RbacAuthorizationV1Api(admin_api)
    rbac.create_namespaced_role(namespace, {
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    })
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reader-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    })

    with cluster.service_account_client(namespace, "reader") as api:
        pods = client.CoreV1Api(api).list_namespaced_pod(namespace)
        with pytest.raises(client.ApiException) as refused:
            client.CoreV1Api(api).list_namespaced_secret(namespace)

    assert pods.items == []
    assert refused.value.status == 403


def test_pod_security_admission_enforces_the_namespace_level(admin_api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(admin_api)
    core.patch_namespace(namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})

    with pytest.raises(client.ApiException) as refused:
        core.create_namespaced_pod(namespace, {
            "metadata": {"name": "privileged"},
            "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
        })

    assert refused.value.status == 403
    assert "violates PodSecurity" in refused.value.body


# --- kubetune's CRDs -------------------------------------------------------------------------

CRD_DIR = REPO / "crds"


def _kubetune_crds() -> list[Path]:
    return sorted(CRD_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def kubetune_crds(cluster: Cluster) -> list[dict[str, Any]]:
    """kubetune's CRDs from crds/, installed and Established."""
    files = _kubetune_crds()
    assert files, f"no CRDs in {CRD_DIR}: they are generated from kubetune.api and committed"
    cluster.apply_crds(*files)
    return [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def test_kubetune_crds_are_established(cluster: Cluster, kubetune_crds: list[dict[str, Any]]) -> None:
    kinds = {crd["spec"]["names"]["kind"] for crd in kubetune_crds}
    for crd in kubetune_crds:
        stored = json.loads(cluster.kubectl("get", "crd", crd["metadata"]["name"], "-o", "json").stdout)
        assert _conditions(stored).get("Established") == "True", crd["metadata"]["name"]
    assert {"FineTuneJob", "PreferenceDataset", "ModelAdapter"} <= kinds


def _finetunejob_crd(crds: list[dict[str, Any]]) -> dict[str, Any]:
    return next(crd for crd in crds if crd["spec"]["names"]["kind"] == "FineTuneJob")


def _cel_message(schema: dict[str, Any], rule_fragment: str) -> str:
    """The message of the CEL rule (anywhere in `schema`) whose expression contains `rule_fragment`."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.get("x-kubernetes-validations", []):
                if rule_fragment in v["rule"]:
                    found.append(v["message"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    assert found, f"no CEL rule containing {rule_fragment!r} in the FineTuneJob CRD"
    return found[0]


VALID_FINETUNEJOB: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "tiny"},
    "spec": {
        "model": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
        "stages": [{
            "name": "sft",
            "type": "sft",
            "dataset": {"uri": "hf://trl-lib/Capybara", "format": "messages"},
        }],
    },
}


def _create_finetunejob(api: client.ApiClient, namespace: str, body: dict[str, Any], crd: dict[str, Any]) -> Any:
    version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        crd["spec"]["group"], version, namespace, crd["spec"]["names"]["plural"], body, dry_run="All"
    )


def test_api_server_accepts_a_valid_finetunejob(
    admin_api: client.ApiClient, namespace: str, kubetune_crds: list[dict[str, Any]]
) -> None:
    stored = _create_finetunejob(admin_api, namespace, VALID_FINETUNEJOB, _finetunejob_crd(kubetune_crds))

    assert stored["spec"]["model"]["uri"] == "hf://Qwen/Qwen2.5-0.5B"


@pytest.mark.parametrize(
    ("case", "rule_fragment"),
    [("model-uri-and-init", "has(self.init)"), ("duplicate-stage-names", "exists_one")],
)
def test_api_server_refuses_an_invalid_finetunejob_with_the_cel_message(
    admin_api: client.ApiClient, namespace: str, kubetune_crds: list[dict[str, Any]], case: str, rule_fragment: str
) -> None:
    crd = _finetunejob_crd(kubetune_crds)
    body = copy.deepcopy(VALID_FINETUNEJOB)
    if case == "model-uri-and-init":
        body["spec"]["model"]["init"] = {"architecture": "llama", "tokenizer": {"train": {}}}
    else:
        body["spec"]["stages"].append(copy.deepcopy(body["spec"]["stages"][0]))
    message = _cel_message(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], rule_fragment)

    with pytest.raises(client.ApiException) as refused:
        _create_finetunejob(admin_api, namespace, body, crd)

    assert refused.value.status == 422
    assert message in json.loads(refused.value.body)["message"]


@pytest.mark.parametrize(("field", "change"), [
    ("model", {"model": {"uri": "hf://Qwen/Qwen2.5-1.5B"}}),
    ("stages", {"stages": [{**VALID_FINETUNEJOB["spec"]["stages"][0], "hyperparameters": {"learningRate": 1e-5}}]}),
    ("output", {"output": {"uri": "s3://models/elsewhere"}}),
])
def test_api_server_refuses_an_update_of_an_immutable_field(
    admin_api: client.ApiClient, namespace: str, kubetune_crds: list[dict[str, Any]], field: str,
    change: dict[str, Any],
) -> None:
    """A stored FineTuneJob keeps its model, stages and output: the CRD's `self == oldSelf` rules
    refuse an update, with the message that says what to do instead. Pausing it stays possible."""
    crd = _finetunejob_crd(kubetune_crds)
    group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
    version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
    custom = client.CustomObjectsApi(admin_api)
    body = copy.deepcopy(VALID_FINETUNEJOB)
    body["spec"]["output"] = {"uri": "s3://models/tiny"}
    before = custom.create_namespaced_custom_object(group, version, namespace, plural, body)

    with pytest.raises(client.ApiException) as refused:
        custom.patch_namespaced_custom_object(group, version, namespace, plural, "tiny", {"spec": change})

    assert refused.value.status == 422
    said = json.loads(refused.value.body)["message"]
    assert f"spec.{field}: Invalid value" in said and f"spec.{field} is immutable; create a new FineTuneJob" in said, said
    after = custom.get_namespaced_custom_object(group, version, namespace, plural, "tiny")
    assert after["spec"] == before["spec"]
    # the control: a field meant to change still may
    custom.patch_namespaced_custom_object(group, version, namespace, plural, "tiny",
                                          {"spec": {"runPolicy": {"suspend": True}}})
    assert custom.get_namespaced_custom_object(group, version, namespace, plural, "tiny")["spec"]["runPolicy"]["suspend"]
