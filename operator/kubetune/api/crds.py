"""Render the kubetune CRDs (apiextensions.k8s.io/v1) from the pydantic models.

    kubetune crds            # writes crds/*.yaml
    kubetune crds --check    # exits 1 when the committed files differ

Pydantic's JSON schema is turned into a structural OpenAPI v3 schema: `$ref`s inlined,
`Optional` unwrapped (absent means unset), titles dropped, descriptions required on every
field, CEL rules carried as `x-kubernetes-validations`. Nothing here is hand-written per
field: change the models, rerun, commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.api.finetunejob import FineTuneJobSpec, FineTuneJobStatus
from kubetune.api.meta import GROUP, VERSION
from kubetune.api.modeladapter import ModelAdapterSpec, ModelAdapterStatus
from kubetune.api.preferencedataset import PreferenceDatasetSpec, PreferenceDatasetStatus

_KEEP = {
    "type", "description", "default", "enum", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "format",
    "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
}


class SchemaError(ValueError):
    pass


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return merged
    return node


def _structural(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = _resolve(node, defs)
    if "anyOf" in node:  # Optional[X]: absent means unset, so keep X alone
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise SchemaError(f"{path}: unions are not structural; use one type")
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        if outer.get("default", 0) is None:
            outer.pop("default")
        node = {**_resolve(options[0], defs), **outer}
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEEP}
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if not isinstance(out.get(bound), bool) and bound in out:  # JSON Schema's number -> OpenAPI v3.0's flag
            out[limit], out[bound] = out[bound], True
    if "const" in node:
        out["enum"] = [node["const"]]
        out.setdefault("type", "string")
    if node.get("type") == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties", {})
        if props:
            out["properties"] = {name: _field(sub, defs, f"{path}.{name}") for name, sub in props.items()}
            required = [r for r in node.get("required", []) if "default" not in props[r]]
            if required:
                out["required"] = required
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = _structural(extra, defs, f"{path}[*]")
        elif not props and extra is not False:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("type") == "array":
        out["items"] = _structural(node.get("items", {}), defs, f"{path}[]")
    return out


def _field(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    out = _structural(node, defs, path)
    if not out.get("description"):
        raise SchemaError(f"{path}: every field needs a description (kubectl explain shows it)")
    return out


def _schema(model: type[BaseModel], path: str) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}), path)


def _root(spec: type[BaseModel], status: type[BaseModel], kind: str, spec_doc: str, status_doc: str) -> dict[str, Any]:
    spec_schema = _schema(spec, "spec")
    spec_schema["description"] = spec_doc
    status_schema = _schema(status, "status")
    status_schema["description"] = status_doc
    return {
        "type": "object",
        "description": kind_docs[kind],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of the object: kubetune.io/v1alpha1."},
            "kind": {"type": "string", "description": f"Kind of the object: {kind}."},
            "metadata": {"type": "object"},  # the API server allows nothing else here
            "spec": spec_schema,
            "status": status_schema,
        },
        "required": ["spec"],
    }


kind_docs = {
    "FineTuneJob": "A bounded pipeline of training stages (pretrain, sft, reward, dpo, kto, ...), each run as a PyTorchJob.",
    "PreferenceDataset": "A comparison data set that kubetune validates before stages train on it.",
    "ModelAdapter": "A trained model or LoRA adapter served through a KServe InferenceService.",
}

_SUCCEEDED = '.status.conditions[?(@.type=="Succeeded")].status'
_READY = '.status.conditions[?(@.type=="Ready")].status'


def _crd(kind: str, plural: str, short: str, root: dict[str, Any], columns: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def render() -> dict[str, dict[str, Any]]:
    """File name -> CRD object, for every kubetune kind."""
    ftj = _crd(
        "FineTuneJob", "finetunejobs", "ftj",
        _root(FineTuneJobSpec, FineTuneJobStatus, "FineTuneJob", "The pipeline to run.", "Where the pipeline stands."),
        [
            {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage", "description": "The stage running now."},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress", "description": "Stages done and the current stage's progress."},
            {"name": "Succeeded", "type": "string", "jsonPath": _SUCCEEDED, "description": "Whether every stage succeeded."},
            {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Succeeded")].reason', "priority": 1},
            {"name": "Ready", "type": "string", "jsonPath": _READY, "priority": 1},
            _age(),
        ],
    )
    prefds = _crd(
        "PreferenceDataset", "preferencedatasets", "prefds",
        _root(PreferenceDatasetSpec, PreferenceDatasetStatus, "PreferenceDataset", "The data set and how to read it.", "What validation found."),
        [
            {"name": "Schema", "type": "string", "jsonPath": ".spec.schema"},
            {"name": "Rows", "type": "integer", "jsonPath": ".status.rows"},
            {"name": "Ready", "type": "string", "jsonPath": _READY},
            {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason', "priority": 1},
            {"name": "Checksum", "type": "string", "jsonPath": ".status.checksum", "priority": 1},
            _age(),
        ],
    )
    adapter = _crd(
        "ModelAdapter", "modeladapters", "adapter",
        _root(ModelAdapterSpec, ModelAdapterStatus, "ModelAdapter", "What to serve and how.", "Where serving stands."),
        [
            {"name": "Model", "type": "string", "jsonPath": ".status.modelName"},
            {"name": "Ready", "type": "string", "jsonPath": _READY},
            {"name": "URL", "type": "string", "jsonPath": ".status.url", "priority": 1},
            {"name": "InferenceService", "type": "string", "jsonPath": ".status.inferenceService", "priority": 1},
            _age(),
        ],
    )
    return {
        "kubetune.io_finetunejobs.yaml": ftj,
        "kubetune.io_preferencedatasets.yaml": prefds,
        "kubetune.io_modeladapters.yaml": adapter,
    }


def dump(obj: dict[str, Any]) -> str:
    header = "# Generated by `kubetune crds` from kubetune.api; do not edit.\n"
    return header + yaml.safe_dump(obj, sort_keys=False, width=120)


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, obj in render().items():
        path = out_dir / name
        path.write_text(dump(obj))
        written.append(path)
    return written


def check(out_dir: Path) -> list[str]:
    """Names of the CRD files that are missing or differ from what the models render."""
    stale = []
    for name, obj in render().items():
        path = out_dir / name
        if not path.exists() or path.read_text() != dump(obj):
            stale.append(name)
    return stale
