"""The kubetune-serve runtime against KServe's real CRDs (from KServe's Go module): the
ClusterServingRuntime kubetune ships (the Helm chart's templates/servingruntime.yaml, rendered by
helm as for a cluster with KServe) and the
InferenceServices the operator renders for `serving.runtime: kubetune` (a whole image
classifier; prompt-tuning and bottleneck adapters sharing one base) are accepted by the API
server as they are, not merely stored by a test double."""

from __future__ import annotations

import subprocess

import yaml

from e2e.conftest import CHART, KSERVE, Cluster, go_module_dir
from kubetune.api.modeladapter import ModelAdapter
from kubetune.publish import kserve


def adapter(name: str, **spec: object) -> ModelAdapter:
    return ModelAdapter.model_validate({"apiVersion": "kubetune.io/v1alpha1", "kind": "ModelAdapter",
                                        "metadata": {"name": name, "namespace": "ns"}, "spec": spec})


def test_kserve_accepts_the_kubetune_serve_runtime_and_its_inferenceservices(
    cluster: Cluster, operator_crds: None, namespace: str,
) -> None:
    crd = go_module_dir(KSERVE) / "config" / "crd" / "full" / "serving.kserve.io_clusterservingruntimes.yaml"
    cluster.apply_crds(crd)
    runtime = subprocess.run(
        [str(cluster.bin_dir / "helm"), "template", "kt", str(CHART), "--namespace", "kubetune-system",
         "--api-versions", "serving.kserve.io/v1alpha1/ClusterServingRuntime",
         "--show-only", "templates/servingruntime.yaml"], check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    proc = cluster.kubectl("apply", "--dry-run=server", "-o", "yaml", "-f", "-", input=runtime)
    stored = yaml.safe_load(proc.stdout)
    assert stored["metadata"]["name"] == kserve.KUBETUNE_RUNTIME
    assert [f["name"] for f in stored["spec"]["supportedModelFormats"]] == [kserve.KUBETUNE_FORMAT]
    (container,) = stored["spec"]["containers"]
    assert container["securityContext"] == yaml.safe_load(runtime)["spec"]["containers"][0]["securityContext"]

    classifier = adapter("digits", mergedUri="pvc://runs/vision/classify", serving={"runtime": "kubetune", "gpus": 0})
    base = "pvc://runs/chat/sft"
    prompt = adapter("prompt", baseModelUri=base, adapterUri="pvc://runs/chat/prompt", serving={"runtime": "kubetune"})
    bottleneck = adapter("bottleneck", baseModelUri=base, adapterUri="s3://bucket/bottleneck",
                         serving={"runtime": "kubetune"})
    for members in ([classifier], [prompt, bottleneck]):
        isvc = kserve.render(kserve.service_name(members[0]), namespace, members, storage_secret="aws")
        proc = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-o", "yaml", "-f", "-",
                               input=yaml.safe_dump(isvc))
        model = yaml.safe_load(proc.stdout)["spec"]["predictor"]["model"]
        assert model["runtime"] == "kubetune-serve" and model["modelFormat"]["name"] == "kubetune"
        assert model["args"] == isvc["spec"]["predictor"]["model"]["args"]  # nothing pruned by the schema
