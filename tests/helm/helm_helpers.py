"""What the chart tests share: the helm and kubeconform binaries, rendering the chart, and
strict JSON schemas for kubeconform, made offline from the real API definitions.

    .venv/bin/python -m pytest tests/helm

Schemas (kubeconform has no network here, and its default registry is a web site):
- built-in kinds: the OpenAPI (swagger.json) of the Kubernetes version the local cluster runs,
  from the k8s.io/kubernetes Go module;
- kubetune's and kopf's CRDs (the chart's copies), the Kubeflow PyTorchJob CRD (from the
  training-operator module, via e2e/cluster/build), prometheus-operator's ServiceMonitor,
  PodMonitor and PrometheusRule CRDs (from its Go module), and KServe's ClusterServingRuntime CRD
  (from its Go module, the version the e2e tests run).
Every object schema without x-kubernetes-preserve-unknown-fields refuses unknown fields.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kubetune"
BUILD = REPO / "e2e" / "cluster" / "build"
K8S_MODULES = REPO / "e2e" / "cluster" / "modules" / "kubernetes"
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
MONITORING_CRDS = ("servicemonitors", "podmonitors", "prometheusrules")
KSERVE = "github.com/kserve/kserve@v0.15.2"  # as e2e/conftest.py
# What `--api-versions` tells `helm template` for a cluster with KServe (the chart's runtime needs it).
KSERVE_RUNTIME_API = "serving.kserve.io/v1alpha1/ClusterServingRuntime"
# kubeconform's path template: <group>/<kind>_<version>.json ("v1" is the core group's folder).
SCHEMA_LOCATION = "{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"

# Values that turn every optional part of the chart on.
ALL_ON: dict[str, Any] = {
    "metrics": {"serviceMonitor": {"enabled": True, "additionalLabels": {"release": "prometheus"}},
                "podMonitor": {"enabled": True, "additionalLabels": {"release": "prometheus"}}},
    "prometheusRule": {"enabled": True, "additionalLabels": {"release": "prometheus"}},
    "dashboards": {"enabled": True},
    "networkPolicy": {"enabled": True, "apiServerCidrs": ["10.0.0.1/32"],
                      "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]},
    "trainer": {"serviceAccountName": "trainer",
                "validation": {"nodeSelector": {"pool": "cpu"},
                               "tolerations": [{"key": "dedicated", "value": "cpu", "effect": "NoSchedule"},
                                               {"key": "spot"}]}},
}


@cache
def bin_dir() -> Path:
    """The folder of helm, kubeconform and kubectl (built by e2e/cluster/build, cached)."""
    path = Path(subprocess.run([str(BUILD), "--print-bin-dir"], check=True, capture_output=True, text=True).stdout.strip())
    if not all((path / b).is_file() for b in ("helm", "kubeconform")):
        subprocess.run([str(BUILD)], check=True)
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(bin_dir() / "helm"), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def template(values: dict[str, Any] | None = None, *, release: str = "kt", namespace: str = "kubetune-system",
             tmp: Path, check: bool = True, api_versions: tuple[str, ...] = (),
             show_only: str | None = None) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with `values` (a values file, as a user would write it), as for a
    cluster that serves `api_versions` (besides the built-in ones) too."""
    values_file = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
    values_file.write_text(yaml.safe_dump(values or {}))
    extra = [f"--api-versions={v}" for v in api_versions] + ([f"--show-only={show_only}"] if show_only else [])
    return helm("template", release, str(CHART), "--namespace", namespace, "--values", str(values_file), *extra,
                check=check)


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def rules_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rendered PrometheusRule's spec: a Prometheus rule file."""
    return dict(find(docs, "PrometheusRule")["spec"])


# --- schemas --------------------------------------------------------------------------------


def _go_module_dir(module: str, cwd: Path | None = None) -> Path:
    if not shutil.which("go"):
        raise AssertionError("Go is needed to read the Kubernetes and prometheus-operator modules (the build needs it too)")
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    proc = subprocess.run(["go", "mod", "download", "-json", module], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    info = json.loads(proc.stdout or "{}")
    if proc.returncode != 0 or "Dir" not in info:
        raise AssertionError(f"go mod download {module} failed: {info.get('Error') or proc.stderr}")
    return Path(info["Dir"])


def kubernetes_version() -> str:
    for line in (K8S_MODULES / "go.mod").read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["k8s.io/kubernetes"] or parts[:2] == ["require", "k8s.io/kubernetes"]:
            return next(p for p in parts if p.startswith("v1."))
    raise AssertionError("no k8s.io/kubernetes in e2e/cluster/modules/kubernetes/go.mod")


def monitoring_crds() -> list[Path]:
    """prometheus-operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs."""
    folder = _go_module_dir(PROMETHEUS_OPERATOR) / "example" / "prometheus-operator-crd"
    return [folder / f"monitoring.coreos.com_{plural}.yaml" for plural in MONITORING_CRDS]


def kserve_runtime_crd() -> Path:
    """KServe's ClusterServingRuntime CRD."""
    return _go_module_dir(KSERVE) / "config" / "crd" / "full" / "serving.kserve.io_clusterservingruntimes.yaml"


def pytorchjob_crd() -> Path:
    folder = Path(subprocess.run([str(BUILD), "--print-crd-dir"], check=True, capture_output=True, text=True).stdout.strip())
    path = folder / "kubeflow.org_pytorchjobs.yaml"
    if not path.is_file():
        subprocess.run([str(BUILD)], check=True)
    return path


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 schema (of a CRD, or a swagger definition) as a strict JSON schema."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("format", "nullable") or key.startswith("x-kubernetes-"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_strict(sub) for sub in value]
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string") or schema.get("format") == "int-or-string":
        out.pop("type", None)
        out["oneOf"] = [{"type": "string"}, {"type": "integer"}]
    if "properties" in out and "additionalProperties" not in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _refs(node: Any, into: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            into.add(ref.rsplit("/", 1)[-1])
        for v in node.values():
            _refs(v, into)
    elif isinstance(node, list):
        for v in node:
            _refs(v, into)


def _closure(definitions: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        found: set[str] = set()
        _refs(definitions[name], found)
        todo.extend(found - seen)
    return {n: definitions[n] for n in sorted(seen)}


def _envelope(api_version: str, kind: str) -> dict[str, Any]:
    return {"apiVersion": {"enum": [api_version]}, "kind": {"enum": [kind]}}


@cache
def schema_dir(root: Path) -> Path:
    """Write strict kubeconform schemas for every built-in kind and the CRDs above into `root`."""
    swagger_path = _go_module_dir(f"k8s.io/kubernetes@{kubernetes_version()}", K8S_MODULES) / "api" / "openapi-spec" / "swagger.json"
    swagger = json.loads(swagger_path.read_text())["definitions"]
    definitions = {name: _strict(d) for name, d in swagger.items()}
    definitions = {k: v for k, v in definitions.items()}
    definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {"oneOf": [{"type": "string"}, {"type": "number"}]}
    definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = {"oneOf": [{"type": "string"}, {"type": "integer"}]}

    def write(api_version: str, kind: str, schema: dict[str, Any]) -> None:
        group, _, version = api_version.rpartition("/")
        path = root / (group or version) / f"{kind.lower()}_{version}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema))

    for name, d in swagger.items():
        for gvk in d.get("x-kubernetes-group-version-kind") or []:
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            write(api_version, gvk["kind"], {
                "definitions": _closure(definitions, [name]),
                "allOf": [{"$ref": f"#/definitions/{name}"}],
                "properties": _envelope(api_version, gvk["kind"]),
                "required": ["apiVersion", "kind"],
            })
    crd_files = [*sorted((CHART / "files" / "crds").glob("*.yaml")), pytorchjob_crd(), *monitoring_crds(),
                 kserve_runtime_crd()]
    object_meta = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    for path in crd_files:
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                api_version = f"{spec['group']}/{version['name']}"
                schema = _strict(version["schema"]["openAPIV3Schema"])
                schema.setdefault("properties", {})
                schema["properties"]["metadata"] = {"$ref": f"#/definitions/{object_meta}"}
                schema["properties"].update(_envelope(api_version, spec["names"]["kind"]))
                schema["additionalProperties"] = False
                schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
                schema["definitions"] = _closure(definitions, [object_meta])
                write(api_version, spec["names"]["kind"], schema)
    return root


def kubeconform(manifests: str, schemas: Path) -> tuple[int, list[dict[str, Any]]]:
    """Run `kubeconform -strict` on `manifests` with the local schemas: (exit code, resources)."""
    proc = subprocess.run(
        [str(bin_dir() / "kubeconform"), "-strict", "-summary", "-output", "json",
         "-schema-location", f"{schemas}/{SCHEMA_LOCATION}", "-"],
        input=manifests, capture_output=True, text=True, timeout=120,
    )
    report = json.loads(proc.stdout or "{}")
    return proc.returncode, list(report.get("resources") or [])
