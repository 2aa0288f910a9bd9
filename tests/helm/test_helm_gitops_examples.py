"""examples/gitops: the Argo CD and Flux manifests are valid against those tools' real CRDs,
the chart renders with the values they pass, and the FineTuneJobs kustomization builds into
manifests `kubetune validate` accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from helm_helpers import REPO, _go_module_dir, _strict, bin_dir, documents, kubeconform, template

GITOPS = REPO / "examples" / "gitops"
# The tools' CRDs, from their Go modules (the module proxy serves them).
TOOL_CRDS = [
    ("github.com/argoproj/argo-cd/v3@v3.2.0", "manifests/crds/application-crd.yaml"),
    ("github.com/fluxcd/source-controller@v1.8.5", "config/crd/bases/source.toolkit.fluxcd.io_gitrepositories.yaml"),
    ("github.com/fluxcd/source-controller@v1.8.5", "config/crd/bases/source.toolkit.fluxcd.io_helmrepositories.yaml"),
    ("github.com/fluxcd/helm-controller@v1.4.0", "config/crd/bases/helm.toolkit.fluxcd.io_helmreleases.yaml"),
    ("github.com/fluxcd/kustomize-controller@v1.9.6", "config/crd/bases/kustomize.toolkit.fluxcd.io_kustomizations.yaml"),
]


@pytest.fixture(scope="module")
def gitops_schemas(schemas: Path) -> Path:
    """The session's schemas plus Argo CD's and Flux's kinds."""
    import json

    for module, rel in TOOL_CRDS:
        for crd in yaml.safe_load_all((_go_module_dir(module) / rel).read_text()):
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = _strict(version["schema"]["openAPIV3Schema"])
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                schema["properties"]["apiVersion"] = {"enum": [f"{spec['group']}/{version['name']}"]}
                schema["properties"]["kind"] = {"enum": [spec["names"]["kind"]]}
                path = schemas / spec["group"] / f"{spec['names']['kind'].lower()}_{version['name']}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(schema))
    return schemas


def _manifests() -> list[Path]:
    return sorted(p for p in GITOPS.rglob("*.yaml") if p.name != "kustomization.yaml")


def test_every_manifest_passes_kubeconform_strict(gitops_schemas: Path) -> None:
    text = "\n---\n".join(p.read_text() for p in _manifests())

    code, problems = kubeconform(text, gitops_schemas)

    assert code == 0, "\n".join(f"{p['kind']} {p['name']}: {p['msg']}" for p in problems)
    kinds = {d["kind"] for d in documents(text)}
    assert {"Application", "GitRepository", "HelmRelease", "Kustomization", "FineTuneJob", "PreferenceDataset"} <= kinds


def test_kubeconform_refuses_a_misspelt_helmrelease(gitops_schemas: Path) -> None:
    text = (GITOPS / "flux" / "kubetune.yaml").read_text().replace("  releaseName:", "  releasName:")
    code, problems = kubeconform(text, gitops_schemas)
    assert code == 1 and "releasName" in problems[0]["msg"]


def _values() -> dict[str, dict[str, Any]]:
    app = yaml.safe_load((GITOPS / "argocd" / "kubetune.yaml").read_text())
    release = yaml.safe_load((GITOPS / "flux" / "kubetune.yaml").read_text())
    assert app["spec"]["source"]["path"] == "helm/kubetune"
    assert release["spec"]["chart"]["spec"]["chart"] == "./helm/kubetune"
    return {"argocd": app["spec"]["source"]["helm"]["valuesObject"], "flux": release["spec"]["values"]}


@pytest.mark.parametrize("tool", ["argocd", "flux"])
def test_the_chart_renders_with_the_tools_values(tool: str, schemas: Path, tmp_path: Path) -> None:
    text = template(_values()[tool], release="kubetune", namespace="kubetune-system", tmp=tmp_path).stdout

    code, problems = kubeconform(text, schemas)

    assert code == 0, problems
    kinds = {d["kind"] for d in documents(text)}
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds


def test_finetunejobs_kustomization_builds_valid_kubetune_objects(tmp_path: Path) -> None:
    built = subprocess.run([str(bin_dir() / "kubectl"), "kustomize", str(GITOPS / "finetunejobs")],
                           capture_output=True, text=True, check=True).stdout
    docs = documents(built)
    assert {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs} == {
        ("Namespace", "team-a", None), ("FineTuneJob", "assistant-v1", "team-a"),
        ("PreferenceDataset", "helpfulness-pairs", "team-a")}
    kubetune_only = tmp_path / "kubetune.yaml"
    kubetune_only.write_text(yaml.safe_dump_all([d for d in docs if d["apiVersion"].startswith("kubetune.io/")]))

    proc = subprocess.run([str(Path(sys.executable).parent / "kubetune"), "validate", str(kubetune_only)],
                          capture_output=True, text=True)

    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count(": valid") == 2
