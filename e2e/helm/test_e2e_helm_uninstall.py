"""`helm uninstall` removes the operator and its rights but keeps the CRDs, and with them every
FineTuneJob (crds.keep). Runs last: the session's release is gone afterwards."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from e2e.conftest import Cluster
from e2e.helm.conftest import FTJ, RELEASE, RELEASE_NS, Release, helm


def test_uninstall_keeps_the_crds_and_the_jobs(
    cluster: Cluster, release: Release, admin_api: client.ApiClient, first_pipeline: dict[str, Any]
) -> None:
    namespace = first_pipeline["metadata"]["namespace"]

    helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", "--timeout", "60s")

    crds = [d["metadata"]["name"] for d in release.manifest if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 5
    for name in crds:
        assert cluster.kubectl("get", "crd", name, check=False).returncode == 0, f"{name} was deleted"
    job = client.CustomObjectsApi(admin_api).get_namespaced_custom_object(*FTJ[:2], namespace, FTJ[2], "pipe-a")
    assert job["status"]["progress"] == "3/3"
    for kind, name in (("clusterrole", "kubetune-operator"), ("serviceaccount", "kubetune"), ("deployment", "kubetune")):
        assert cluster.kubectl("get", kind, name, "-n", RELEASE_NS, check=False).returncode != 0, f"{kind}/{name} is left"
