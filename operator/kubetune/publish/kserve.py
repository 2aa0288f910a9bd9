"""ModelAdapters as KServe InferenceServices (serving.kserve.io/v1beta1): huggingface + vLLM, or kubetune-serve.

- A merged model (`mergedUri`) gets its own InferenceService, named after the ModelAdapter.
- Adapters (`adapterUri`) on the same base model share one InferenceService (when
  `serving.shareServer`): the base model is the storageUri, each adapter a vLLM LoRA module
  (`--enable-lora --lora-modules name=path ...`) or a kubetune-serve adapter
  (`--adapter name=path ...`), and clients pick one with `"model": <name>`.
  The shared server is named after the base model (and the runtime, for kubetune) and owned by
  every adapter it serves.

Runtime `kubetune` renders a predictor of model format `kubetune` on the ServingRuntime
`kubetune-serve` (a ClusterServingRuntime the Helm chart installs with the serving image, as
KServe ships its own runtimes), not a custom container: that is how a KServe user picks a model
server, the runtime's image and resources are set once per cluster rather than by the operator,
and KServe's storage-initializer fetches `storageUri` to /mnt/models as for every runtime.
kubetune-serve takes KServe's `--model_name` and reads /mnt/models by default.

Where adapters come from inside the serving pod: pvc:// is mounted read-only at
/mnt/pvc/<claim>; s3:// is fetched by KServe's storage-initializer into /mnt/adapters/<name>;
hf:// is a Hub id vLLM downloads itself. file:// is local only and refused.
"""

from __future__ import annotations

import re
from typing import Any

from kubetune.api.modeladapter import ModelAdapter
from kubetune.backends import LABEL_MANAGED_BY, MANAGED_BY, PVC_ROOT, child_name, pvc_claim, pvc_volumes, short_hash
from kubetune.api.meta import GROUP as KUBETUNE_GROUP

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
API_VERSION = f"{GROUP}/{VERSION}"
# KServe derives Deployment, Service and Knative names from the InferenceService's.
MAX_NAME = 45
LABEL_BASE_MODEL = f"{KUBETUNE_GROUP}/base-model"
LABEL_ADAPTER = f"{KUBETUNE_GROUP}/modeladapter"
STORAGE_INITIALIZER = "kserve/storage-initializer:v0.15.2"
ADAPTER_DIR = "/mnt/adapters"
KUBETUNE_RUNTIME = "kubetune-serve"  # the ServingRuntime / ClusterServingRuntime of kubetune-serve
KUBETUNE_FORMAT = "kubetune"  # the model format it declares


def served_name(adapter: ModelAdapter) -> str:
    return adapter.spec.served_model_name or adapter.metadata.name


def is_shared(adapter: ModelAdapter) -> bool:
    return adapter.spec.adapter_uri is not None and adapter.spec.serving.share_server


def base_key(base_uri: str) -> str:
    """The label value that groups adapters of one base model."""
    return short_hash(base_uri, 16)


def service_name(adapter: ModelAdapter) -> str:
    """The InferenceService that serves `adapter`: its own, or its base model's shared one."""
    if is_shared(adapter):
        base = adapter.spec.base_model_uri or ""
        slug = re.sub(r"[^a-z0-9]+", "-", base.split("://", 1)[-1].lower()).strip("-")[-30:].strip("-") or "base"
        runtime = adapter.spec.serving.runtime
        key = base if runtime == "vllm" else f"{base}#{runtime}"  # one shared server per base and runtime
        return child_name(f"{slug}-{short_hash(key, 6)}", max_length=MAX_NAME)
    return child_name(adapter.metadata.name, max_length=MAX_NAME)


def unsupported_uri(adapter: ModelAdapter) -> str | None:
    """Why KServe cannot load this adapter's uris, or None."""
    for field, uri in (("baseModelUri", adapter.spec.base_model_uri), ("adapterUri", adapter.spec.adapter_uri),
                       ("mergedUri", adapter.spec.merged_uri)):
        if uri and uri.startswith("file://"):
            return f"spec.{field} {uri} is a local path; serve from pvc://, s3:// or hf://"
    return None


def _adapter_path(adapter: ModelAdapter) -> tuple[str, dict[str, Any] | None]:
    """(path vLLM loads the adapter from, the initContainer that fetches it or None)."""
    uri = adapter.spec.adapter_uri or ""
    scheme, rest = uri.split("://", 1)
    if scheme == "pvc":
        return f"{PVC_ROOT}/{rest}", None
    if scheme == "hf":
        return rest, None
    target = f"{ADAPTER_DIR}/{adapter.metadata.name}"
    init = {
        "name": child_name("fetch", adapter.metadata.name),
        "image": STORAGE_INITIALIZER,
        "args": [uri, target],
        "volumeMounts": [{"name": "adapters", "mountPath": ADAPTER_DIR}],
    }
    return target, init


def render(name: str, namespace: str, adapters: list[ModelAdapter], storage_secret: str | None = None) -> dict[str, Any]:
    """The InferenceService `name` serving `adapters`: one merged model, or LoRA adapters on one base.

    Owner references are the caller's. `adapters` must be non-empty; for LoRA they share one
    base model, and the server takes the largest gpus, replicas and maxLoraRank among them.
    """
    adapters = sorted(adapters, key=lambda a: a.metadata.name)
    first = adapters[0]
    merged = first.spec.merged_uri is not None
    kubetune = first.spec.serving.runtime == "kubetune"
    labels = {LABEL_MANAGED_BY: MANAGED_BY}
    model: dict[str, Any] = {"modelFormat": {"name": "huggingface"}}
    if kubetune:
        model = {"modelFormat": {"name": KUBETUNE_FORMAT}, "runtime": KUBETUNE_RUNTIME}
    predictor: dict[str, Any] = {"minReplicas": max(a.spec.serving.replicas for a in adapters), "model": model}
    gpus = max(a.spec.serving.gpus for a in adapters)
    if merged:
        labels[LABEL_ADAPTER] = first.metadata.name
        model["storageUri"] = first.spec.merged_uri
        model["args"] = [f"--model_name={served_name(first)}"] + ([] if kubetune else ["--backend=vllm"])
    else:
        base = first.spec.base_model_uri or ""
        labels[LABEL_BASE_MODEL] = base_key(base)
        model["storageUri"] = base
        modules, inits = [], []
        for a in adapters:
            path, init = _adapter_path(a)
            modules.append(f"{served_name(a)}={path}")
            if init:
                inits.append(init)
        rank = max(a.spec.serving.max_lora_rank for a in adapters)
        model["args"] = [f"--model_name={name}", *(f"--adapter={m}" for m in modules)] if kubetune else [
            f"--model_name={name}", "--backend=vllm", "--enable-lora", f"--max-lora-rank={rank}",
            f"--max-loras={len(modules)}", "--lora-modules", *modules,
        ]
        claims = {c: True for c in (pvc_claim(a.spec.adapter_uri) for a in adapters) if c}
        volumes, mounts = pvc_volumes(claims)
        if inits:
            volumes.append({"name": "adapters", "emptyDir": {}})
            mounts.append({"name": "adapters", "mountPath": ADAPTER_DIR, "readOnly": True})
            if storage_secret:
                for init in inits:
                    init["envFrom"] = [{"secretRef": {"name": storage_secret, "optional": True}}]
            predictor["initContainers"] = inits
        if volumes:
            predictor["volumes"] = volumes
            model["volumeMounts"] = mounts
    if gpus:
        model["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"predictor": predictor},
    }


def observe(isvc: dict[str, Any]) -> tuple[bool, str, str | None]:
    """(ready, message, url) of an InferenceService from its Ready condition."""
    status = isvc.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    url = status.get("url")
    if ready is None:
        return False, "The InferenceService has no Ready condition yet.", url
    message = str(ready.get("message") or ready.get("reason") or "")
    return ready.get("status") == "True", message, url
