"""`helm uninstall` removes the operator and its rights but keeps the CRDs, and with them every
FineTuneJob (crds.keep). The test puts the release back afterwards, so it may run in any order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from e2e.conftest import Cluster
from e2e.helm.conftest import (
    FTJ, RELEASE, RELEASE_NS, SERVICE_ACCOUNT, ChartOperator, Release, helm, install, token_kubeconfig,
)


@pytest.fixture
def uninstalled(cluster: Cluster, release: Release, operator: ChartOperator, first_pipeline: dict[str, Any],
                tmp_path: Path) -> Iterator[None]:
    """The release uninstalled while its operator is stopped; afterwards installed again with the
    same values and the operator restarted with a token of the new ServiceAccount."""
    operator.stop()
    try:
        helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", "--timeout", "60s")
        yield
    finally:
        install(cluster, release.values)
        operator.kubeconfig = token_kubeconfig(cluster, RELEASE_NS, SERVICE_ACCOUNT, tmp_path / "sa.kubeconfig")
        operator.start()


def test_uninstall_keeps_the_crds_and_the_jobs(
    cluster: Cluster, release: Release, admin_api: client.ApiClient, first_pipeline: dict[str, Any], uninstalled: None
) -> None:
    namespace = first_pipeline["metadata"]["namespace"]

    crds = [d["metadata"]["name"] for d in release.manifest if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 5
    for name in crds:
        assert cluster.kubectl("get", "crd", name, check=False).returncode == 0, f"{name} was deleted"
    job = client.CustomObjectsApi(admin_api).get_namespaced_custom_object(*FTJ[:2], namespace, FTJ[2], "pipe-a")
    assert job["status"]["progress"] == "3/3"
    for kind, name in (("clusterrole", "kubetune-operator"), ("serviceaccount", "kubetune"), ("deployment", "kubetune")):
        assert cluster.kubectl("get", kind, name, "-n", RELEASE_NS, check=False).returncode != 0, f"{kind}/{name} is left"
