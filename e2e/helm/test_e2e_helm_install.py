"""`helm install` into the local control plane: every object of the chart, monitoring ones
included, is accepted by the API server (the real CRD schemas of prometheus-operator), and the
kubetune-serve ClusterServingRuntime is installed because the cluster serves KServe's CRD (Helm's
capabilities, read from the API server's discovery)."""

from __future__ import annotations

import json

from e2e.conftest import CHART, Cluster
from e2e.helm.conftest import RELEASE, RELEASE_NS, Release, helm


def test_helm_install_succeeds_and_every_object_is_stored(cluster: Cluster, release: Release) -> None:
    status = json.loads(helm(cluster, "status", RELEASE, "--namespace", RELEASE_NS, "--output", "json").stdout)
    assert status["info"]["status"] == "deployed"

    missing = []
    for doc in release.manifest:
        ns = ["-n", doc["metadata"].get("namespace", RELEASE_NS)] if doc["kind"] not in (
            "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding") else []
        resource = f"{doc['kind']}.{doc['apiVersion'].split('/')[0]}" if "/" in doc["apiVersion"] else doc["kind"]
        if cluster.kubectl("get", resource, doc["metadata"]["name"], *ns, check=False).returncode != 0:
            missing.append(f"{doc['kind']}/{doc['metadata']['name']}")
    assert missing == []
    kinds = {d["kind"] for d in release.manifest}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service",
            "ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget",
            "ClusterServingRuntime"} <= kinds


def test_the_stored_dashboard_carries_grafanas_label(cluster: Cluster, release: Release) -> None:
    cm = json.loads(cluster.kubectl("get", "configmap", "-n", RELEASE_NS, "-l", "grafana_dashboard=1", "-o", "json").stdout)
    (item,) = cm["items"]
    assert json.loads(item["data"]["kubetune.json"])["uid"] == "kubetune"


def test_helm_upgrade_upgrades_the_crds_in_place(cluster: Cluster, release: Release) -> None:
    """The CRDs are templates: an upgrade applies them again (Helm's crds/ folder never would)."""
    before = json.loads(helm(cluster, "status", RELEASE, "--namespace", RELEASE_NS, "--output", "json").stdout)

    helm(cluster, "upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--reuse-values",
         "--set", "commonLabels.upgraded=yes")

    after = json.loads(helm(cluster, "status", RELEASE, "--namespace", RELEASE_NS, "--output", "json").stdout)
    assert after["info"]["status"] == "deployed" and after["version"] == before["version"] + 1
    crd = json.loads(cluster.kubectl("get", "crd", "finetunejobs.kubetune.io", "-o", "json").stdout)
    assert crd["metadata"]["labels"]["upgraded"] == "yes"
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    established = [c for c in crd["status"]["conditions"] if c["type"] == "Established"]
    assert established[0]["status"] == "True"
