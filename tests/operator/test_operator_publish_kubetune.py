"""Publishing with the kubetune runtime: what vLLM cannot serve (image classifiers, reward models,
adapters that cannot be merged, CPU-only serving) is published to kubetune-serve automatically,
with the reason; an explicit `runtime: vllm` for such a result is refused by the API server."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.api import FineTuneJob
from kubetune.api.modeladapter import ModelAdapter
from kubetune.api.validation import validate_object
from kubetune.controllers.pipeline import adapter_spec, publish_runtime
from kubetune.publish import kserve

OUT = "pvc://runs/job"


def job(stages: list[dict[str, Any]], publish: dict[str, Any] | None = None, model: str = "hf://Qwen/Qwen2.5-0.5B") -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "pub", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {"model": {"uri": model}, "stages": stages, "output": {"uri": OUT},
                 "publish": {} if publish is None else publish},
    }


def stage(name: str, type_: str, fmt: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, "dataset": {"uri": f"pvc://data/{name}", "format": fmt}, **extra}


SFT = stage("sft", "sft", "promptCompletion")
PREFIX = stage("prefix", "sft", "promptCompletion", tuning={"method": "prefixTuning"})
CLASSIFY = stage("classify", "imageClassification", "imageLabel")


def test_a_prefix_tuning_adapter_is_published_on_its_base_with_the_kubetune_runtime() -> None:
    j = FineTuneJob.model_validate(job([SFT, PREFIX]))

    runtime, why = publish_runtime(j)

    assert runtime == "kubetune" and "vLLM cannot load the prefixTuning adapter of stage prefix" in why
    assert adapter_spec(j, OUT) == {"baseModelUri": f"{OUT}/sft", "adapterUri": f"{OUT}/prefix",
                                    "serving": {"runtime": "kubetune", "gpus": 1, "shareServer": True}}


def test_an_image_classifier_is_published_whole_with_the_kubetune_runtime() -> None:
    j = FineTuneJob.model_validate(job([CLASSIFY], model="hf://google/vit-base-patch16-224"))

    runtime, why = publish_runtime(j)

    assert runtime == "kubetune" and "imageClassification model" in why
    assert adapter_spec(j, OUT) == {"mergedUri": f"{OUT}/classify",
                                    "serving": {"runtime": "kubetune", "gpus": 1, "shareServer": True}}


def test_a_lora_image_classifier_is_merged_for_kubetune_serve() -> None:
    from kubetune.api.stagerun import render_stage_run

    lora = {**CLASSIFY, "tuning": {"method": "lora"}}
    j = FineTuneJob.model_validate(job([lora], model="hf://google/vit-base-patch16-224"))

    assert render_stage_run(j, 0, OUT).merge  # the trainer writes <stage>/merged, with the labels in its config
    assert adapter_spec(j, OUT)["mergedUri"] == f"{OUT}/classify/merged"


def test_causal_lms_stay_on_vllm_unless_serving_has_no_gpu_or_says_otherwise() -> None:
    assert publish_runtime(FineTuneJob.model_validate(job([SFT]))) == ("vllm", "")
    cpu = publish_runtime(FineTuneJob.model_validate(job([SFT], {"gpus": 0})))
    assert cpu[0] == "kubetune" and "gpus is 0" in cpu[1]
    assert publish_runtime(FineTuneJob.model_validate(job([SFT], {"runtime": "kubetune"}))) == ("kubetune", "")


@pytest.mark.parametrize("stages", [[SFT, PREFIX], [CLASSIFY]], ids=["prefix-tuning", "image-classifier"])
def test_runtime_vllm_for_what_vllm_cannot_serve_is_refused(stages: list[dict[str, Any]]) -> None:
    (problem,) = [p for p in validate_object(job(stages, {"runtime": "vllm"})) if p.severity == "error"]
    assert problem.path == "spec.publish" and "vLLM serves" in problem.message
    assert [p for p in validate_object(job(stages)) if p.severity == "error"] == []  # unset: kubetune serves it


def adapter(name: str, **spec: Any) -> ModelAdapter:
    return ModelAdapter.model_validate({"apiVersion": "kubetune.io/v1alpha1", "kind": "ModelAdapter",
                                        "metadata": {"name": name, "namespace": "ns"}, "spec": spec})


def test_a_kubetune_model_is_a_predictor_of_the_kubetune_serve_runtime() -> None:
    a = adapter("digits", mergedUri=f"{OUT}/classify", serving={"runtime": "kubetune", "gpus": 0})

    isvc = kserve.render(kserve.service_name(a), "ns", [a])

    model = isvc["spec"]["predictor"]["model"]
    assert model == {"modelFormat": {"name": "kubetune"}, "runtime": "kubetune-serve",
                     "storageUri": f"{OUT}/classify", "args": ["--model_name=digits"]}


def test_kubetune_adapters_on_one_base_share_a_kubetune_server_apart_from_vllms() -> None:
    base = f"{OUT}/sft"
    a = adapter("prefix", baseModelUri=base, adapterUri=f"{OUT}/prefix", serving={"runtime": "kubetune"})
    b = adapter("bottleneck", baseModelUri=base, adapterUri="s3://bucket/bottleneck", serving={"runtime": "kubetune"})
    lora = adapter("lora", baseModelUri=base, adapterUri=f"{OUT}/lora")

    name = kserve.service_name(a)
    isvc = kserve.render(name, "ns", [a, b])

    assert kserve.service_name(b) == name != kserve.service_name(lora)
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == "kubetune-serve" and model["storageUri"] == base
    assert model["args"] == [f"--model_name={name}", "--adapter=bottleneck=/mnt/adapters/bottleneck",
                             "--adapter=prefix=/mnt/pvc/runs/job/prefix"]
    (init,) = isvc["spec"]["predictor"]["initContainers"]
    assert init["args"] == ["s3://bucket/bottleneck", "/mnt/adapters/bottleneck"]
