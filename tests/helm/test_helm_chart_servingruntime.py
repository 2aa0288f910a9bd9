"""The chart ships kubetune-serve as KServe's ClusterServingRuntime `kubetune-serve`: rendered only where
the cluster serves that kind (so installing without KServe works), with the image and tag from the
values (the chart's appVersion by default), the flags kubetune-serve accepts, a restricted
securityContext, and kubeconform -strict accepting it against KServe's own CRD. The operator asks for
it by the name and model format it renders (kubetune.publish.kserve)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from helm_helpers import ALL_ON, CHART, KSERVE_RUNTIME_API, documents, kubeconform, merge, template
from kubetune.publish import kserve

SHOW = "templates/servingruntime.yaml"
APP_VERSION = str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])
DIGEST = "sha256:" + "ab" * 32


def runtimes(values: dict[str, Any], tmp: Path, *, kserve_api: bool = True) -> list[dict[str, Any]]:
    text = template(values, tmp=tmp, api_versions=(KSERVE_RUNTIME_API,) if kserve_api else ()).stdout
    return [d for d in documents(text) if d["kind"] == "ClusterServingRuntime"]


def container(values: dict[str, Any], tmp: Path) -> dict[str, Any]:
    (runtime,) = runtimes(values, tmp)
    (c,) = runtime["spec"]["containers"]
    return dict(c)


def test_rendered_only_where_the_cluster_serves_kserve_runtimes(tmp_path: Path) -> None:
    assert runtimes({}, tmp_path, kserve_api=False) == []  # no KServe: the rest of the chart installs alone
    assert runtimes({"servingRuntime": {"enabled": False}}, tmp_path) == []
    (runtime,) = runtimes({}, tmp_path)
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["metadata"]["name"] == kserve.KUBETUNE_RUNTIME  # what the operator's InferenceServices name
    assert "namespace" not in runtime["metadata"]  # cluster-scoped
    assert [f["name"] for f in runtime["spec"]["supportedModelFormats"]] == [kserve.KUBETUNE_FORMAT]
    assert runtime["spec"]["protocolVersions"] == ["v1", "v2"]
    assert runtime["metadata"]["labels"]["app.kubernetes.io/component"] == "serving-runtime"


def test_image_and_tag_come_from_the_values(tmp_path: Path) -> None:
    assert container({}, tmp_path)["image"] == f"ghcr.io/kubetune/serving:{APP_VERSION}"  # tag: the appVersion
    c = container({"servingRuntime": {"image": {"repository": "registry.local/kubetune-serving", "tag": "dev",
                                                "pullPolicy": "Always"}}}, tmp_path)
    assert (c["image"], c["imagePullPolicy"]) == ("registry.local/kubetune-serving:dev", "Always")
    c = container({"servingRuntime": {"image": {"digest": DIGEST}}}, tmp_path)
    assert c["image"] == f"ghcr.io/kubetune/serving@{DIGEST}"


def test_resources_security_context_and_env_come_from_the_values(tmp_path: Path) -> None:
    c = container({}, tmp_path)
    assert c["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}
    sc = c["securityContext"]  # what PodSecurity "restricted" demands of a container
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in c["env"]

    extra = {"name": "OMP_NUM_THREADS", "value": "4"}
    values = {"servingRuntime": {"resources": {"limits": {"cpu": "4", "memory": "16Gi"}}, "extraEnv": [extra],
                                 "imagePullSecrets": [{"name": "regcred"}]}}
    (runtime,) = runtimes(values, tmp_path)
    (c,) = runtime["spec"]["containers"]
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    assert c["env"][-1] == extra and runtime["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


def test_its_flags_are_ones_kubetune_serve_accepts(tmp_path: Path) -> None:
    from kubetune_serve.server import DEFAULT_MODEL_DIR, parser

    c = container({}, tmp_path)
    args = parser().parse_args(c["args"])  # exits (SystemExit) on an unknown flag

    assert args.model_dir == DEFAULT_MODEL_DIR and args.http_port == 8080 and args.enable_grpc is False
    assert c["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}


@pytest.mark.parametrize("values", [{}, merge(ALL_ON, {"servingRuntime": {
    "image": {"digest": DIGEST}, "imagePullSecrets": [{"name": "regcred"}],
    "extraEnv": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token"}}}]}})],
    ids=["defaults", "all-on"])
def test_rendered_with_kserve_it_passes_kubeconform_strict(values: dict[str, Any], schemas: Path,
                                                           tmp_path: Path) -> None:
    text = template(values, tmp=tmp_path, api_versions=(KSERVE_RUNTIME_API,)).stdout

    code, problems = kubeconform(text, schemas)

    assert code == 0, "\n".join(f"{p['kind']} {p['name']}: {p['msg']}" for p in problems)
    assert "ClusterServingRuntime" in {d["kind"] for d in documents(text)}


def test_kubeconform_refuses_a_misspelt_runtime_field(schemas: Path, tmp_path: Path) -> None:
    """The ClusterServingRuntime schema is KServe's CRD made strict, not a stand-in that takes anything."""
    text = template({}, tmp=tmp_path, api_versions=(KSERVE_RUNTIME_API,), show_only=SHOW).stdout
    bad = text.replace("  protocolVersions:", "  protocolVersion:")

    code, problems = kubeconform(bad, schemas)

    assert code == 1 and [(p["kind"], p["status"]) for p in problems] == [("ClusterServingRuntime", "statusInvalid")]
    assert "protocolVersion" in problems[0]["msg"]

