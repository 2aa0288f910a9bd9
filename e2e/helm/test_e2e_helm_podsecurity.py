"""PodSecurity "restricted", decided by the API server's own admission: a namespace that
enforces it accepts the pods kubetune renders (trainer and validation pods, the operator's own
pod from the chart) and refuses the same pods without kubetune's securityContext."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from e2e.conftest import KWOK_TOLERATION, Cluster, fresh_namespace, wait_for
from e2e.helm.conftest import Release
from kubetune.api.finetunejob import FineTuneJob
from kubetune.api.preferencedataset import PreferenceDataset
from kubetune.api.stagerun import render_stage_run
from kubetune.backends import BackendSettings
from kubetune.backends import pytorchjob, validation

JOB = FineTuneJob.model_validate({
    "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "psa"},
    "spec": {"model": {"uri": "hf://Qwen/Qwen2.5-0.5B"}, "output": {"uri": "pvc://models/psa"},
             "stages": [{"name": "sft", "type": "sft", "dataset": {"uri": "pvc://data/chat.jsonl", "format": "messages"},
                         "tuning": {"method": "lora"}, "resources": {"nodes": 2, "gpusPerNode": 8,
                                                                     "tolerations": [KWOK_TOLERATION]}}]},
})
DATASET = PreferenceDataset.model_validate({
    "apiVersion": "kubetune.io/v1alpha1", "kind": "PreferenceDataset", "metadata": {"name": "pairs", "generation": 1},
    "spec": {"source": {"uri": "s3://data/pairs.jsonl"}, "schema": "paired"},
})
RESTRICTED = BackendSettings()  # the operator's defaults, and the chart's (trainer.securityContext.restricted)
UNRESTRICTED = BackendSettings(restricted_security_context=False)


@pytest.fixture
def enforcing(admin_api: client.ApiClient) -> Iterator[str]:
    with fresh_namespace(admin_api, f"psa-{uuid.uuid4().hex[:6]}", pod_security="restricted") as name:
        yield name


def trainer_pod(settings: BackendSettings) -> dict[str, Any]:
    run = render_stage_run(JOB, 0, "pvc://models/psa", None, metrics_port=settings.trainer_metrics_port)
    template = pytorchjob.render(JOB, 0, run, settings)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "trainer-", **template["metadata"]},
            "spec": template["spec"]}


def validation_pod(settings: BackendSettings) -> dict[str, Any]:
    template = validation.render(DATASET, settings)["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "validate-", **template["metadata"]},
            "spec": template["spec"]}


def create(cluster: Cluster, namespace: str, pod: dict[str, Any]) -> tuple[int, str]:
    """Create a pod as the admin (kubectl: the API server's own JSON); (201, "") or (403, why)."""
    proc = cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False)
    if proc.returncode == 0:
        return 201, ""
    return (403 if "(Forbidden)" in proc.stderr else 0), proc.stderr


def test_restricted_namespace_accepts_the_trainer_and_validation_pods(
    cluster: Cluster, admin_api: client.ApiClient, enforcing: str
) -> None:
    pods = {"trainer": trainer_pod(RESTRICTED), "validation": validation_pod(RESTRICTED)}

    results = {what: create(cluster, enforcing, pod) for what, pod in pods.items()}

    assert results == dict.fromkeys(pods, (201, ""))
    assert len(client.CoreV1Api(admin_api).list_namespaced_pod(enforcing).items) == 2


def test_the_charts_operator_pods_are_admitted_in_a_restricted_namespace(
    admin_api: client.ApiClient, release: Release
) -> None:
    """The release's namespace enforces "restricted" (see the release fixture); the ReplicaSet
    controller created the Deployment's pods there (KWOK plays them: no image runs here)."""
    labels = client.CoreV1Api(admin_api).read_namespace(release.namespace).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    replicas = release.find("Deployment")["spec"]["replicas"]

    pods = wait_for("the operator's pods", lambda: (p := client.CoreV1Api(admin_api).list_namespaced_pod(
        release.namespace, label_selector="app.kubernetes.io/component=operator").items) and len(p) == replicas and p,
        timeout=60)

    assert all(p.spec.service_account_name == "kubetune" for p in pods)
    refused = client.CoreV1Api(admin_api).list_namespaced_event(release.namespace, field_selector="reason=FailedCreate").items
    assert refused == []


def test_restricted_namespace_refuses_them_without_the_security_context(cluster: Cluster, enforcing: str) -> None:
    """The control: PodSecurity really is enforced, and it is kubetune's securityContext that passes it."""
    for pod in (trainer_pod(UNRESTRICTED), validation_pod(UNRESTRICTED)):
        status, body = create(cluster, enforcing, pod)
        assert status == 403
        assert 'violates PodSecurity "restricted:latest"' in body
        assert "allowPrivilegeEscalation != false" in body and "runAsNonRoot != true" in body


def _create_pytorchjob(admin_api: client.ApiClient, namespace: str, job: FineTuneJob) -> None:
    run = render_stage_run(job, 0, "pvc://models/psa", None, metrics_port=RESTRICTED.trainer_metrics_port)
    body = pytorchjob.render(job, 0, run, RESTRICTED)
    for replica in body["spec"]["pytorchReplicaSpecs"].values():  # no claims here: nothing would bind them
        spec = replica["template"]["spec"]
        spec["volumes"] = [v for v in spec["volumes"] if "persistentVolumeClaim" not in v]
        for c in spec["containers"]:
            c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] in {v["name"] for v in spec["volumes"]}]
    client.CoreV1Api(admin_api).create_namespaced_config_map(namespace, pytorchjob.stagerun_configmap(job, 0, run))
    client.CustomObjectsApi(admin_api).create_namespaced_custom_object(
        pytorchjob.GROUP, pytorchjob.VERSION, namespace, pytorchjob.PLURAL, body)


def _with_nodes(nodes: int) -> FineTuneJob:
    job = JOB.model_copy(deep=True)
    job.spec.stages[0].resources.nodes = nodes
    return job


def _refusals(admin_api: client.ApiClient, namespace: str) -> list[str]:
    return [e.message for e in client.CoreV1Api(admin_api).list_namespaced_event(
        namespace, field_selector="reason=FailedCreatePod").items]


def test_restricted_namespace_accepts_a_rendered_single_node_pytorchjob(
    admin_api: client.ApiClient, enforcing: str
) -> None:
    """The training-operator creates the master pod of a rendered PyTorchJob there (it records a
    FailedCreatePod event instead when admission refuses a pod)."""
    _create_pytorchjob(admin_api, enforcing, _with_nodes(1))

    pods = wait_for("the PyTorchJob's pod", lambda: client.CoreV1Api(admin_api).list_namespaced_pod(
        enforcing, label_selector="training.kubeflow.org/job-name=psa-sft").items, timeout=60)

    assert [p.metadata.name for p in pods] == ["psa-sft-master-0"]
    assert _refusals(admin_api, enforcing) == []


def test_restricted_namespace_accepts_a_rendered_multi_node_pytorchjob(
    admin_api: client.ApiClient, enforcing: str
) -> None:
    _create_pytorchjob(admin_api, enforcing, _with_nodes(2))

    wait_for("the master pod", lambda: client.CoreV1Api(admin_api).list_namespaced_pod(
        enforcing, label_selector="training.kubeflow.org/job-name=psa-sft").items, timeout=60)
    wait_for("the worker pod or its refusal", lambda: _refusals(admin_api, enforcing) or len(
        client.CoreV1Api(admin_api).list_namespaced_pod(
            enforcing, label_selector="training.kubeflow.org/job-name=psa-sft").items) == 2, timeout=60)

    assert _refusals(admin_api, enforcing) == []
