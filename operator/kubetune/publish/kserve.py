"""ModelAdapters as KServe InferenceServices (serving.kserve.io/v1beta1): huggingface + vLLM, or kubetune-serve;
or as LLMInferenceServices (serving.kserve.io/v1alpha1, KServe's LLM stack).

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

`serving.api: llmInferenceService` renders a KServe LLMInferenceService
(serving.kserve.io/v1alpha1, KServe >= 0.16) instead, with the same names, labels and sharing:
`spec.model` is the merged model, or the base model with the adapters as
`spec.model.lora.adapters` ({name, uri}); KServe's LLM stack renders the vLLM pods from its
LLMInferenceServiceConfig templates, and kubetune sets only the replicas and the GPUs of the
`main` container. KServe 0.16 and 0.17 accept and store the adapters, but neither their
controller nor their well-known vLLM template passes them to vLLM yet (`vllm serve /mnt/models`),
so there it serves merged models; serving.api inferenceService serves LoRA adapters today.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kubetune.api.modeladapter import ModelAdapter
from kubetune.backends import LABEL_MANAGED_BY, MANAGED_BY, PVC_ROOT, child_name, pvc_claim, pvc_volumes, short_hash
from kubetune.api.meta import GROUP as KUBETUNE_GROUP

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
API_VERSION = f"{GROUP}/{VERSION}"
# KServe derives Deployment, Service and Knative names from the InferenceService's.
MAX_NAME = 45
# In RawDeployment mode KServe makes the predictor's host name `<name>-predictor-<namespace>` (its
# default domain template) and refuses to reconcile an InferenceService where that label is longer
# than a DNS label's 63 characters: the name is cut further in long namespaces, down to MIN_NAME.
HOST_LABEL, PREDICTOR_INFIX, MIN_NAME = 63, "-predictor-", 12
LABEL_BASE_MODEL = f"{KUBETUNE_GROUP}/base-model"
LABEL_ADAPTER = f"{KUBETUNE_GROUP}/modeladapter"
STORAGE_INITIALIZER = "kserve/storage-initializer:v0.15.2"
ADAPTER_DIR = "/mnt/adapters"
KUBETUNE_RUNTIME = "kubetune-serve"  # the ServingRuntime / ClusterServingRuntime of kubetune-serve
KUBETUNE_FORMAT = "kubetune"  # the model format it declares
LLM_VERSION, LLM_PLURAL, LLM_KIND = "v1alpha1", "llminferenceservices", "LLMInferenceService"
LLM_CONTAINER = "main"  # the container of KServe's LLMInferenceServiceConfig templates that runs vLLM


@dataclass(frozen=True)
class ServingApi:
    """A KServe API a ModelAdapter is served through (`spec.serving.api`)."""

    kind: str
    version: str
    plural: str

    @property
    def resource(self) -> tuple[str, str, str]:
        """(group, version, plural), as kopf and the custom objects API take it."""
        return GROUP, self.version, self.plural


APIS = {
    "inferenceService": ServingApi(KIND, VERSION, PLURAL),
    "llmInferenceService": ServingApi(LLM_KIND, LLM_VERSION, LLM_PLURAL),
}


def serving_api(adapter: ModelAdapter) -> ServingApi:
    return APIS[adapter.spec.serving.api]


def served_name(adapter: ModelAdapter) -> str:
    return adapter.spec.served_model_name or adapter.metadata.name


def is_shared(adapter: ModelAdapter) -> bool:
    return adapter.spec.adapter_uri is not None and adapter.spec.serving.share_server


def base_key(base_uri: str) -> str:
    """The label value that groups adapters of one base model."""
    return short_hash(base_uri, 16)


def max_name(namespace: str | None) -> int:
    """The longest InferenceService name KServe reconciles in `namespace` (see HOST_LABEL)."""
    return max(MIN_NAME, min(MAX_NAME, HOST_LABEL - len(PREDICTOR_INFIX) - len(namespace or "")))


def service_name(adapter: ModelAdapter) -> str:
    """The (LLM)InferenceService that serves `adapter`: its own, or its base model's shared one."""
    longest = max_name(adapter.metadata.namespace)
    if is_shared(adapter):
        base = adapter.spec.base_model_uri or ""
        slug = re.sub(r"[^a-z0-9]+", "-", base.split("://", 1)[-1].lower()).strip("-")[-30:].strip("-") or "base"
        serving = adapter.spec.serving  # one shared server per base, runtime and API
        key = base + "".join(f"#{v}" for v in (serving.runtime, serving.api) if v not in ("vllm", "inferenceService"))
        return child_name(f"{slug}-{short_hash(key, 6)}", max_length=longest)
    return child_name(adapter.metadata.name, max_length=longest)


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
        rank = vllm_lora_rank(max(a.spec.serving.max_lora_rank for a in adapters))
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
        model["resources"] = _gpu_resources(gpus)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"predictor": predictor},
    }


def render_llm(name: str, namespace: str, adapters: list[ModelAdapter]) -> dict[str, Any]:
    """The LLMInferenceService `name` serving `adapters`: one merged model, or LoRA adapters on one
    base as `spec.model.lora.adapters`. Owner references are the caller's; the replicas and GPUs
    are the largest among the adapters, as for an InferenceService."""
    adapters = sorted(adapters, key=lambda a: a.metadata.name)
    first = adapters[0]
    labels = {LABEL_MANAGED_BY: MANAGED_BY}
    if first.spec.merged_uri is not None:
        labels[LABEL_ADAPTER] = first.metadata.name
        model: dict[str, Any] = {"uri": first.spec.merged_uri, "name": served_name(first)}
    else:
        base = first.spec.base_model_uri or ""
        labels[LABEL_BASE_MODEL] = base_key(base)
        model = {"uri": base, "name": name, "lora": {"adapters": [
            {"name": served_name(a), "uri": a.spec.adapter_uri} for a in adapters]}}
    spec: dict[str, Any] = {"model": model, "replicas": max(a.spec.serving.replicas for a in adapters)}
    gpus = max(a.spec.serving.gpus for a in adapters)
    if gpus:
        spec["template"] = {"containers": [{"name": LLM_CONTAINER, "resources": _gpu_resources(gpus)}]}
    return {
        "apiVersion": f"{GROUP}/{LLM_VERSION}",
        "kind": LLM_KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    }


def render_for(name: str, namespace: str, adapters: list[ModelAdapter], storage_secret: str | None = None) -> dict[str, Any]:
    """The object of the adapters' `serving.api` (they share one) named `name` that serves them."""
    if adapters[0].spec.serving.api == "llmInferenceService":
        return render_llm(name, namespace, adapters)
    return render(name, namespace, adapters, storage_secret)


def _gpu_resources(gpus: int) -> dict[str, Any]:
    return {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}


def observe(isvc: dict[str, Any]) -> tuple[bool, str, str | None]:
    """(ready, message, url) of an InferenceService or LLMInferenceService from its Ready condition."""
    status = isvc.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    url = status.get("url")
    if ready is None:
        return False, f"The {isvc.get('kind') or KIND} has no Ready condition yet.", url
    message = str(ready.get("message") or ready.get("reason") or "")
    return ready.get("status") == "True", message, url


# --max-lora-rank values vLLM accepts (0.32: its argument's choices); a rank between them is served by the next.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds adapters of `rank` (vLLM refuses to start with
    another value); ranks above 512 stay as they are, and vLLM says so when it starts."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
