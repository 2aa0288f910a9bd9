"""`serving.api: llmInferenceService`: a ModelAdapter served by a KServe LLMInferenceService
(serving.kserve.io/v1alpha1): the object rendered (model, LoRA adapters, replicas, GPUs, labels),
the refusal of a runtime KServe's LLM stack does not run, the controller creating it and mirroring
its readiness, and the operator watching it through a server-side label selector."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from kubetune import operator as kubetune_operator
from kubetune.api.modeladapter import ModelAdapter
from kubetune.api.validation import validate_object
from kubetune.backends import LABEL_MANAGED_BY, MANAGED_BY
from kubetune.controllers import common, modeladapter
from kubetune.publish import kserve

LLM = {"api": "llmInferenceService"}
BASE = "hf://meta-llama/Llama-3.2-1B"


def body(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "ModelAdapter",
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": 1}, "spec": spec}


def adapter(name: str, **spec: Any) -> ModelAdapter:
    return ModelAdapter.model_validate(body(name, **spec))


def test_a_merged_model_is_the_model_of_its_own_llminferenceservice() -> None:
    a = adapter("bot", mergedUri="pvc://models/bot/sft", servedModelName="support-bot",
                serving={**LLM, "gpus": 2, "replicas": 3})

    obj = kserve.render_for(kserve.service_name(a), "ns", [a])

    assert (obj["apiVersion"], obj["kind"]) == ("serving.kserve.io/v1alpha1", "LLMInferenceService")
    assert obj["metadata"] == {"name": "bot", "namespace": "ns",
                               "labels": {LABEL_MANAGED_BY: MANAGED_BY, kserve.LABEL_ADAPTER: "bot"}}
    assert obj["spec"] == {
        "model": {"uri": "pvc://models/bot/sft", "name": "support-bot"},
        "replicas": 3,
        "template": {"containers": [{"name": "main", "resources": {
            "limits": {"nvidia.com/gpu": "2"}, "requests": {"nvidia.com/gpu": "2"}}}]},
    }


def test_adapters_on_one_base_share_one_llminferenceservice_as_lora_adapters() -> None:
    a = adapter("support", baseModelUri=BASE, adapterUri="pvc://models/support/sft", serving={**LLM, "replicas": 2})
    b = adapter("sales", baseModelUri=BASE, adapterUri="s3://bucket/sales/dpo", servedModelName="sales-v2",
                serving={**LLM, "gpus": 4})
    isvc_twin = adapter("twin", baseModelUri=BASE, adapterUri="pvc://models/twin")

    name = kserve.service_name(a)
    obj = kserve.render_for(name, "ns", [a, b])

    assert kserve.service_name(b) == name != kserve.service_name(isvc_twin)  # one server per base and API
    assert name.startswith("meta-llama-llama-3-2-1b-") and len(name) <= kserve.MAX_NAME
    assert obj["spec"]["model"] == {"uri": BASE, "name": name, "lora": {"adapters": [
        {"name": "sales-v2", "uri": "s3://bucket/sales/dpo"},
        {"name": "support", "uri": "pvc://models/support/sft"},
    ]}}
    assert obj["spec"]["replicas"] == 2
    assert obj["spec"]["template"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert obj["metadata"]["labels"][kserve.LABEL_BASE_MODEL] == kserve.base_key(BASE)


def test_no_gpus_leaves_the_pod_template_to_kserve() -> None:
    a = adapter("cpu", mergedUri="pvc://models/cpu", serving={**LLM, "gpus": 0})

    assert "template" not in kserve.render_for("cpu", "ns", [a])["spec"]


def test_the_default_api_still_renders_an_inferenceservice() -> None:
    a = adapter("bot", mergedUri="pvc://models/bot/sft")

    assert a.spec.serving.api == "inferenceService"
    assert kserve.render_for("bot", "ns", [a])["kind"] == "InferenceService"


def test_llminferenceservice_with_the_kubetune_runtime_is_refused_naming_the_field() -> None:
    problems = validate_object(body("x", mergedUri="pvc://m", serving={**LLM, "runtime": "kubetune"}))

    assert [p.path for p in problems] == ["spec.serving.api"]
    assert "serving.runtime vllm" in problems[0].message
    assert validate_object(body("x", mergedUri="pvc://m", serving={**LLM, "runtime": "vllm"})) == []


class FakeCluster:
    """The calls the ModelAdapter controller makes, on dicts."""

    def __init__(self, *adapters: dict[str, Any]) -> None:
        self.objects: dict[tuple[tuple[str, str, str], str], dict[str, Any]] = {
            (common.MODELADAPTERS, a["metadata"]["name"]): a for a in adapters}
        self.statuses: list[dict[str, Any]] = []

    def get(self, resource: tuple[str, str, str], namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((resource, name))

    def list(self, resource: tuple[str, str, str], namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        return [o for (r, _), o in self.objects.items() if r == resource]

    def create(self, resource: tuple[str, str, str], namespace: str, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        key = (resource, obj["metadata"]["name"])
        created = key not in self.objects
        self.objects.setdefault(key, obj)
        return self.objects[key], created

    def patch_status(self, resource: tuple[str, str, str], obj: dict[str, Any], status: dict[str, Any]) -> None:
        self.statuses.append(status)
        obj["status"] = status


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    fake = FakeCluster(body("support", baseModelUri=BASE, adapterUri="pvc://models/support", serving=LLM),
                       body("sales", baseModelUri=BASE, adapterUri="pvc://models/sales", serving=LLM),
                       body("plain", baseModelUri=BASE, adapterUri="pvc://models/plain"))
    monkeypatch.setattr(common, "get_custom", fake.get)
    monkeypatch.setattr(common, "list_custom", fake.list)
    monkeypatch.setattr(common, "create_custom", fake.create)
    monkeypatch.setattr(common, "patch_status", fake.patch_status)
    return fake


def test_the_controller_creates_the_llminferenceservice_and_mirrors_its_readiness(cluster: FakeCluster) -> None:
    modeladapter.reconcile("ns", "support")

    name = kserve.service_name(adapter("support", baseModelUri=BASE, adapterUri="pvc://x", serving=LLM))
    (key,) = [k for k in cluster.objects if k[0] != common.MODELADAPTERS]
    assert key == (modeladapter.LLMINFERENCESERVICES, name)
    obj = cluster.objects[key]
    assert [x["name"] for x in obj["spec"]["model"]["lora"]["adapters"]] == ["sales", "support"]  # not "plain"
    assert {(o["name"], o["controller"]) for o in obj["metadata"]["ownerReferences"]} == {
        ("sales", False), ("support", False)}
    (ready,) = cluster.statuses[-1]["conditions"]
    assert (ready["status"], ready["message"]) == ("False", f"LLMInferenceService {name}: The LLMInferenceService "
                                                             "has no Ready condition yet.")

    obj["status"] = {"url": "http://llm.ns.example.com", "conditions": [{"type": "Ready", "status": "True"}]}
    modeladapter.on_inferenceservice(body=kopf.Body(obj), namespace="ns")

    status = cluster.objects[(common.MODELADAPTERS, "sales")]["status"]
    assert status["url"] == "http://llm.ns.example.com" and status["inferenceService"] == name
    assert [(c["type"], c["status"]) for c in status["conditions"]] == [("Ready", "True")]


def test_readiness_whose_event_was_missed_is_mirrored_by_the_resync_timer(cluster: FakeCluster) -> None:
    modeladapter.reconcile("ns", "support")
    support = cluster.objects[(common.MODELADAPTERS, "support")]
    assert modeladapter._waiting_for_service(support["status"])
    (key,) = [k for k in cluster.objects if k[0] != common.MODELADAPTERS]
    cluster.objects[key]["status"] = {"url": "http://llm.ns.example.com",
                                      "conditions": [{"type": "Ready", "status": "True"}]}  # and no event

    modeladapter.resync_modeladapter(name="support", namespace="ns")

    assert support["status"]["url"] == "http://llm.ns.example.com"
    assert not modeladapter._waiting_for_service(support["status"])  # the timer stops for a Ready adapter
    missing = {"conditions": [{"type": "Ready", "status": "False", "reason": "KServeMissing"}]}
    assert not modeladapter._waiting_for_service(missing)  # that reason has its own retry, which applies


def test_the_operator_watches_llminferenceservices_it_manages_by_a_server_side_selector() -> None:
    settings = kopf.OperatorSettings()
    kubetune_operator.configure(settings=settings)
    resource = modeladapter.LLMINFERENCESERVICES

    assert resource == ("serving.kserve.io", "v1alpha1", "llminferenceservices")
    assert kubetune_operator.CHILD_SELECTORS[resource] == f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    assert settings.watching.label_selectors[resource] == f"{LABEL_MANAGED_BY}={MANAGED_BY}"
