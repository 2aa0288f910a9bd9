"""ModelAdapter (kubetune.io/v1alpha1, short name `adapter`): a trained artifact to serve.

The operator renders it into a KServe InferenceService; adapters on the same base model can
share one server: vLLM's (`--enable-lora` with several `--lora-modules`) for LoRA, or
kubetune-serve's (`--adapter NAME=DIR`) for every kind of adapter. With `serving.api:
llmInferenceService` it renders a KServe LLMInferenceService instead (KServe's vLLM-based LLM
stack, serving.kserve.io/v1alpha1), LoRA adapters as its `spec.model.lora.adapters`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.api.meta import URI_PATTERN, Condition, KubeModel, ObjectMeta, cel, rules


class Serving(KubeModel, json_schema_extra=rules(
    cel("self.api != 'llmInferenceService' || self.runtime == 'vllm'",
        "serving.api llmInferenceService is KServe's vLLM-based LLM stack: set serving.runtime vllm, "
        "or serving.api inferenceService to serve with kubetune-serve", ".api"),
)):
    api: Literal["inferenceService", "llmInferenceService"] = Field(
        default="inferenceService",
        description="KServe API that serves it: inferenceService (serving.kserve.io/v1beta1 InferenceService) or "
                    "llmInferenceService (serving.kserve.io/v1alpha1 LLMInferenceService, KServe's vLLM-based LLM "
                    "stack, from KServe 0.16; runtime vllm only, LoRA adapters as spec.model.lora.adapters).",
        json_schema_extra=rules(cel("self == oldSelf", "serving.api is immutable; create a new ModelAdapter to serve "
                                                       "it through the other API")),
    )
    runtime: Literal["vllm", "kubetune"] = Field(
        default="vllm",
        description="Serving runtime: vllm (KServe's huggingface runtime, vLLM backend: causal LMs, LoRA adapters, "
                    "GPUs) or kubetune (the kubetune-serve ServingRuntime: every model kubetune trains, on CPU or GPU).",
    )
    gpus: int = Field(default=1, ge=0, le=16, description="GPUs of the serving pod.")
    replicas: int = Field(default=1, ge=0, le=100, description="Minimum replicas of the InferenceService (replicas of an LLMInferenceService).")
    share_server: bool = Field(
        default=True, description="Serve this adapter from the InferenceService (or LLMInferenceService) of its base model with the "
                                   "other adapters."
    )
    max_lora_rank: int = Field(default=64, ge=1, le=1024, description="Largest LoRA rank the shared vLLM server accepts (InferenceService only; rendered as the next value vLLM takes: 1, 8, 16, 32, 64, 128, 256, 320 or 512).")


class ModelAdapterSpec(KubeModel, json_schema_extra=rules(
    cel("has(self.adapterUri) != has(self.mergedUri)", "set exactly one of adapterUri (a LoRA adapter) or mergedUri (a whole model)"),
    cel("!has(self.adapterUri) || has(self.baseModelUri)", "adapterUri needs baseModelUri, the model the adapter was trained on"),
)):
    base_model_uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048, description="The base model the adapter was trained on."
    )
    adapter_uri: str | None = Field(
        default=None, pattern=URI_PATTERN, max_length=2048,
        description="An adapter (a stage's output folder): LoRA for vllm; any PEFT method or bottleneck adapters for kubetune.",
    )
    merged_uri: str | None = Field(default=None, pattern=URI_PATTERN, max_length=2048, description="A whole model with weights merged.")
    served_model_name: str | None = Field(
        default=None, max_length=253, description="Name clients use in requests (default: the ModelAdapter's name)."
    )
    serving: Serving = Field(default_factory=lambda: Serving(), description="How it is served.")


class ModelAdapterStatus(KubeModel):
    observed_generation: int | None = Field(default=None, description="The .metadata.generation the status describes.")
    conditions: list[Condition] | None = Field(
        default=None, description="Ready mirrors the (LLM)InferenceService's readiness.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    inference_service: str | None = Field(default=None, description="Name of the InferenceService (or LLMInferenceService) that serves it.")
    url: str | None = Field(default=None, description="URL of the (LLM)InferenceService.")
    model_name: str | None = Field(default=None, description="Model name to put in requests.")


class ModelAdapter(KubeModel):
    api_version: Literal["kubetune.io/v1alpha1"] = Field(default="kubetune.io/v1alpha1", description="kubetune.io/v1alpha1")
    kind: Literal["ModelAdapter"] = Field(default="ModelAdapter", description="ModelAdapter")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: ModelAdapterSpec = Field(description="What to serve and how.")
    status: ModelAdapterStatus | None = Field(default=None, description="Where serving stands.")
