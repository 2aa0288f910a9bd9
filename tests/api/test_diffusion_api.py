"""The diffusion stage in the API: clip -> diffusion chains the text encoder, a diffusion stage after another
continues its pipeline, and what cannot run is refused naming the field."""

from __future__ import annotations

from typing import Any

from kubetune.api import registry
from kubetune.api.finetunejob import FineTuneJob
from kubetune.api.stagerun import render_stage_run
from kubetune.api.validation import validate_object

OUT = "s3://b/out"
UNET = {"sampleSize": 16, "blockOutChannels": [32, 64]}


def stage(name: str, type: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type, "dataset": {"uri": f"file://{name}.jsonl", "format": "imageCaption"}, **extra}


def job(model: dict[str, Any], *stages: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
            "spec": {"model": model, "stages": list(stages)}}


CLIP_INIT = {"init": {"architecture": "clip", "imageSize": 32, "patchSize": 8}}


def test_diffusion_is_implemented_with_its_block() -> None:
    info = registry.get("diffusion")
    assert info.implemented and info.text_encoder and info.block is registry.DiffusionSpec
    assert registry.get("clip").text_encoder is False


def test_clip_then_diffusion_conditions_on_the_clip_stage_and_builds_a_unet() -> None:
    manifest = job(CLIP_INIT, stage("captions", "clip"), stage("generate", "diffusion", diffusion={"unet": UNET}),
                   stage("again", "diffusion", tuning={"method": "lora"}))
    assert validate_object(manifest) == []
    ftj = FineTuneJob.model_validate(manifest)
    first, second = render_stage_run(ftj, 1, OUT), render_stage_run(ftj, 2, OUT)
    assert first.text_encoder_uri == f"{OUT}/captions" and first.model_uri is None and first.model_init is None
    unet = first.settings(registry.DiffusionSpec).unet
    assert unet is not None and unet.sample_size == 16 and unet.block_out_channels == [32, 64]
    # the next diffusion stage fine-tunes the pipeline the first wrote
    assert second.model_uri == f"{OUT}/generate" and second.text_encoder_uri == f"{OUT}/captions"
    assert render_stage_run(ftj, 0, OUT).text_encoder_uri is None  # the clip stage conditions on nothing


def test_a_lora_clip_stage_hands_over_its_merged_model_and_the_block_overrides_it() -> None:
    manifest = job({"uri": "hf://openai/clip-vit-base-patch32"}, stage("captions", "clip", tuning={"method": "lora"}),
                   stage("generate", "diffusion", diffusion={"unet": UNET}))
    ftj = FineTuneJob.model_validate(manifest)
    assert render_stage_run(ftj, 0, OUT).merge  # the next stage reads merged weights
    assert render_stage_run(ftj, 1, OUT).text_encoder_uri == f"{OUT}/captions/merged"
    manifest["spec"]["stages"][1]["diffusion"]["textEncoderUri"] = "pvc://models/clip"
    assert render_stage_run(FineTuneJob.model_validate(manifest), 1, OUT).text_encoder_uri == "pvc://models/clip"


def test_fine_tuning_a_pipeline_needs_no_unet_sizes_and_refuses_them_after_a_diffusion_stage() -> None:
    sd = job({"uri": "hf://stable-diffusion-v1-5/stable-diffusion-v1-5"},
             stage("style", "diffusion", tuning={"method": "lora"}))
    assert validate_object(sd) == []
    run = render_stage_run(FineTuneJob.model_validate(sd), 0, OUT)
    assert run.model_uri == "hf://stable-diffusion-v1-5/stable-diffusion-v1-5" and run.text_encoder_uri is None

    twice = job(CLIP_INIT, stage("captions", "clip"), stage("a", "diffusion", diffusion={"unet": UNET}),
                stage("b", "diffusion", diffusion={"unet": UNET}))
    assert [(p.path, p.message.split(":")[0]) for p in validate_object(twice)] == [
        ("spec.stages[2].diffusion.unet", "stage b continues the pipeline of stage a")]


def test_a_new_unet_trains_in_full() -> None:
    manifest = job(CLIP_INIT, stage("captions", "clip"),
                   stage("generate", "diffusion", diffusion={"unet": UNET}, tuning={"method": "lora"}))
    problems = validate_object(manifest)
    assert [p.path for p in problems] == ["spec.stages[1].tuning.method"], problems
    assert "use tuning.method: full" in problems[0].message
