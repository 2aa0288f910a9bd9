"""The operator runs with nothing but the chart's RBAC: a three-stage pipeline succeeds as the
chart's ServiceAccount, and the API server refuses (403) what the chart does not grant."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from e2e.conftest import CHART, Cluster, wait_for
from e2e.helm.conftest import RELEASE_NS, SERVICE_ACCOUNT, ChartOperator, Release, helm, token_kubeconfig

def rbac_refusals(log: str) -> list[str]:
    """The log lines of requests the API server refused for want of RBAC rights (its 403s say `is
    forbidden: User "..." cannot ...`; a 403 for another reason, such as creating in a namespace
    being deleted, is not one)."""
    return [line for line in log.splitlines() if "is forbidden: User" in line]


CRD = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
       "metadata": {"name": "widgets.example.com"},
       "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                "versions": [{"name": "v1", "served": True, "storage": True,
                              "schema": {"openAPIV3Schema": {"type": "object"}}}]}}


def test_three_stage_pipeline_succeeds_as_the_charts_service_account(
    first_pipeline: dict[str, Any], operator: ChartOperator, admin_api: client.ApiClient, restricted_namespace: str
) -> None:
    status = first_pipeline["status"]
    assert [(s["name"], s["state"]) for s in status["stages"]] == [
        ("pretrain", "Succeeded"), ("sft", "Succeeded"), ("dpo", "Succeeded")]
    assert status["progress"] == "3/3" and status["adapter"] == "pipe-a"
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Succeeded"] == conditions["Ready"] == "True"
    # the pods the training-operator made for it passed PodSecurity "restricted" in this namespace
    pods = client.CoreV1Api(admin_api).list_namespaced_pod(
        restricted_namespace, label_selector="kubetune.io/finetunejob=pipe-a").items
    assert {p.metadata.labels["kubetune.io/stage"] for p in pods} == {"pretrain", "sft", "dpo"}
    assert all(p.status.phase == "Succeeded" for p in pods)
    # the publishing path ran too: the ModelAdapter, and the InferenceService serving it
    def served() -> list[dict[str, Any]]:
        items = client.CustomObjectsApi(admin_api).list_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", restricted_namespace, "inferenceservices")["items"]
        return [i for i in items if any(r["kind"] == "ModelAdapter" and r["name"] == "pipe-a"
                                         for r in i["metadata"].get("ownerReferences") or [])]

    wait_for("the InferenceService of ModelAdapter pipe-a", served, timeout=60)
    # nothing the operator tried was refused
    log = operator.log_text()
    assert not rbac_refusals(log), rbac_refusals(log)[0]


def test_a_preference_dataset_is_validated_as_the_charts_service_account(
    cluster: Cluster, operator: ChartOperator, admin_api: client.ApiClient, restricted_namespace: str,
    first_pipeline: dict[str, Any]
) -> None:
    """The validation path: a batch Job with the chart's tolerations, its pods read back. (KWOK's pod
    exits without writing a report, so the data set is judged ValidationFailed: the point is that the
    operator got that far with the chart's rights.)"""
    body = {"apiVersion": "kubetune.io/v1alpha1", "kind": "PreferenceDataset", "metadata": {"name": "pairs"},
            "spec": {"source": {"uri": "s3://data/pairs.jsonl"}, "schema": "paired"}}
    cluster.kubectl("apply", "-n", restricted_namespace, "-f", "-", input=yaml.safe_dump(body))

    def judged() -> dict[str, Any] | None:
        obj = client.CustomObjectsApi(admin_api).get_namespaced_custom_object(
            "kubetune.io", "v1alpha1", restricted_namespace, "preferencedatasets", "pairs")
        ready = [c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"]
        return ready[0] if ready and ready[0]["reason"] != "Validating" else None

    ready = wait_for("the PreferenceDataset to be judged", judged, timeout=90)

    assert ready["reason"] == "ValidationFailed"
    assert ready["message"].startswith("Could not validate s3://data/pairs.jsonl")
    (job,) = client.BatchV1Api(admin_api).list_namespaced_job(
        restricted_namespace, label_selector="kubetune.io/preferencedataset=pairs").items
    tolerations = [t.to_dict() for t in job.spec.template.spec.tolerations]
    assert {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}.items() <= tolerations[0].items()
    log = operator.log_text()
    assert not rbac_refusals(log), rbac_refusals(log)[0]


@pytest.fixture(scope="module")
def as_operator(cluster: Cluster, release: Release) -> Iterator[client.ApiClient]:
    with cluster.service_account_client(RELEASE_NS, SERVICE_ACCOUNT) as api:
        yield api


def _status(call: Callable[[], Any]) -> int:
    try:
        call()
    except client.ApiException as e:
        return int(e.status)
    return 200


def test_the_service_account_may_do_its_job(as_operator: client.ApiClient, restricted_namespace: str) -> None:
    """The control for the refusals below: the token is valid and the granted rights work."""
    custom = client.CustomObjectsApi(as_operator)
    assert _status(lambda: custom.list_cluster_custom_object("kubetune.io", "v1alpha1", "finetunejobs")) == 200
    assert _status(lambda: client.CoreV1Api(as_operator).list_namespaced_pod(restricted_namespace)) == 200
    assert _status(lambda: client.BatchV1Api(as_operator).list_job_for_all_namespaces()) == 200


def test_the_api_server_refuses_what_the_chart_does_not_grant(
    as_operator: client.ApiClient, restricted_namespace: str, release: Release, admin_api: client.ApiClient,
    first_pipeline: dict[str, Any],
) -> None:
    core, rbac = client.CoreV1Api(as_operator), client.RbacAuthorizationV1Api(as_operator)
    ext, custom = client.ApiextensionsV1Api(as_operator), client.CustomObjectsApi(as_operator)
    (pod, *_) = [p.metadata.name for p in client.CoreV1Api(admin_api).list_namespaced_pod(
        restricted_namespace, label_selector="kubetune.io/finetunejob=pipe-a").items]
    cluster_role = next(d for d in release.manifest if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-operator"))
    refused = {
        "read a Secret in kube-system": lambda: core.list_namespaced_secret("kube-system"),
        "read a Secret in its own namespace": lambda: core.list_namespaced_secret(RELEASE_NS),
        "list Secrets anywhere": lambda: core.list_secret_for_all_namespaces(),
        # (a plain POST, not a websocket: an allowed request would get 400 "Upgrade request required")
        "exec into a pod": lambda: core.connect_post_namespaced_pod_exec(pod, restricted_namespace, command=["sh"]),
        "create a pod": lambda: core.create_namespaced_pod(restricted_namespace, {
            "metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "x"}]}}),
        "bind itself cluster-admin": lambda: rbac.create_cluster_role_binding({
            "metadata": {"name": "steal"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                     "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": RELEASE_NS}]}),
        "widen its own ClusterRole": lambda: rbac.patch_cluster_role(cluster_role["metadata"]["name"], {
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}),
        "create a Role": lambda: rbac.create_namespaced_role(restricted_namespace, {
            "metadata": {"name": "r"}, "rules": []}),
        "create a CRD": lambda: ext.create_custom_resource_definition(CRD),
        "delete kubetune's CRD": lambda: ext.delete_custom_resource_definition("finetunejobs.kubetune.io"),
        "touch another CRD's objects": lambda: custom.list_cluster_custom_object("monitoring.coreos.com", "v1",
                                                                                 "servicemonitors"),
        "delete a FineTuneJob": lambda: custom.delete_namespaced_custom_object(
            "kubetune.io", "v1alpha1", restricted_namespace, "finetunejobs", "pipe-a"),
        "create a FineTuneJob": lambda: custom.create_namespaced_custom_object(
            "kubetune.io", "v1alpha1", restricted_namespace, "finetunejobs", {
                "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}, "spec": {}}),
        "patch another peering object": lambda: custom.patch_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", "someone-else", {"status": {}}),
        "list nodes": lambda: core.list_node(),
        "delete a namespace": lambda: core.delete_namespace(restricted_namespace),
    }

    statuses = {what: _status(call) for what, call in refused.items()}

    assert statuses == dict.fromkeys(refused, 403)


def test_namespaced_mode_confines_the_operator_to_its_namespaces(
    cluster: Cluster, release: Release, admin_api: client.ApiClient, tmp_path: Any
) -> None:
    """A second release with rbac.namespaced: rights in its watched namespace, none elsewhere."""
    core = client.CoreV1Api(admin_api)
    for ns in ("helm-e2e-team-a", "helm-e2e-team-b", "helm-e2e-ns-operator"):
        core.create_namespace({"metadata": {"name": ns}})
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"crds": {"install": False}, "servingRuntime": {"enabled": False},
                                      "rbac": {"namespaced": True, "aggregateToDefaultRoles": False},
                                      "operator": {"watchNamespaces": ["helm-e2e-team-a"]}}))
    try:
        helm(cluster, "install", "scoped", str(CHART), "--namespace", "helm-e2e-ns-operator", "--values", str(values))
        wait_for("the ServiceAccount", lambda: core.list_namespaced_service_account(
            "helm-e2e-ns-operator", field_selector="metadata.name=scoped-kubetune").items, timeout=30)
        with cluster.service_account_client("helm-e2e-ns-operator", "scoped-kubetune") as api:
            custom = client.CustomObjectsApi(api)

            def list_ftj(ns: str) -> Callable[[], Any]:
                return lambda: custom.list_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs")

            assert _status(list_ftj("helm-e2e-team-a")) == 200
            assert _status(list_ftj("helm-e2e-team-b")) == 403
            assert _status(lambda: custom.list_cluster_custom_object("kubetune.io", "v1alpha1", "finetunejobs")) == 403
            assert _status(lambda: client.CoreV1Api(api).list_namespaced_pod("helm-e2e-team-b")) == 403
            assert _status(lambda: custom.list_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings")) == 403
            assert _status(lambda: custom.list_namespaced_custom_object(
                "kopf.dev", "v1", "helm-e2e-team-a", "kopfpeerings")) == 200
    finally:
        helm(cluster, "uninstall", "scoped", "--namespace", "helm-e2e-ns-operator", check=False)
        for ns in ("helm-e2e-team-a", "helm-e2e-team-b", "helm-e2e-ns-operator"):
            core.delete_namespace(ns)


def test_cluster_wide_rbac_watching_named_namespaces_runs_its_peering_there(
    cluster: Cluster, release: Release, admin_api: client.ApiClient, tmp_path: Any
) -> None:
    """Cluster-wide RBAC with operator.watchNamespaces: kopf then meets its peers in a KopfPeering
    in each watched namespace, which the ClusterRole must grant (it crash-looped on a 403 when the
    chart granted ClusterKopfPeerings only). The operator runs with that release's rights alone."""
    core = client.CoreV1Api(admin_api)
    for ns in ("helm-e2e-watched", "helm-e2e-ns-watcher"):
        core.create_namespace({"metadata": {"name": ns}})
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"crds": {"install": False}, "servingRuntime": {"enabled": False},
                                      "rbac": {"aggregateToDefaultRoles": False},
                                      "operator": {"watchNamespaces": ["helm-e2e-watched"]}}))
    op = None
    try:
        helm(cluster, "install", "watcher", str(CHART), "--namespace", "helm-e2e-ns-watcher", "--values", str(values))
        manifest = [d for d in yaml.safe_load_all(helm(cluster, "get", "manifest", "watcher", "--namespace",
                                                         "helm-e2e-ns-watcher").stdout) if d]
        watcher = Release("watcher", "helm-e2e-ns-watcher", manifest, values)
        assert "--namespace=helm-e2e-watched" in watcher.operator_args
        kubeconfig = token_kubeconfig(cluster, "helm-e2e-ns-watcher", "watcher-kubetune", tmp_path / "sa.kubeconfig")
        op = ChartOperator(watcher.operator_args, kubeconfig, tmp_path / "operator.log")
        op.start()

        def joined() -> bool:
            peerings = client.CustomObjectsApi(admin_api).list_namespaced_custom_object(
                "kopf.dev", "v1", "helm-e2e-watched", "kopfpeerings")["items"]
            return any(p["metadata"]["name"] == "watcher-kubetune" and (p.get("status") or {}) for p in peerings)

        wait_for("the operator to join its KopfPeering in the watched namespace", joined, timeout=60)
        assert op.proc is not None and op.proc.poll() is None, op.log_text()[-3000:]
        log = op.log_text()
        assert not rbac_refusals(log), rbac_refusals(log)[0]
    finally:
        if op is not None:
            op.stop()
        helm(cluster, "uninstall", "watcher", "--namespace", "helm-e2e-ns-watcher", check=False)
        for ns in ("helm-e2e-watched", "helm-e2e-ns-watcher"):
            core.delete_namespace(ns)
