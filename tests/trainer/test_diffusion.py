"""diffusion: clip -> diffusion on the generated captioned digits ("a handwritten seven"), as
examples/vision-tiny.yaml runs with `kubetune run`: the held-out noise-prediction loss falls, and a digit
classifier (the example's ResNet, as the imageClassification proof's) reads the digit each held-out caption
asks for in the images the trained pipeline generates; what the stage writes loads with plain
`DiffusionPipeline.from_pretrained`; fine-tuning that pipeline changes every UNet weight (full) or only the
adapters on its attention (LoRA); bad rows stop the stage before training."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from trainer_helpers import Trainer, report, run_example, weights

HP = {"maxLength": None, "batchSize": 64, "loggingSteps": 50, "saveSteps": 100000}
# The diffusion settings of examples/vision-tiny.yaml: scikit-learn's digits are 8x8 pixels, so the UNet generates them
# at that size (two levels, 8x8 and 4x4); the example's CLIP, whose text tower conditions it, is 64 wide.
GUIDANCE, INFERENCE_STEPS, TEXT_WIDTH = 3.0, 25, 64
DIFFUSION = {"unet": {"sampleSize": 8, "blockOutChannels": [32, 64]}, "guidanceScale": GUIDANCE,
             "inferenceSteps": INFERENCE_STEPS}
PER_DIGIT = 10  # images generated per held-out caption for the classifier


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """The digits as `python -m kubetune_trainer.data.synthetic` writes them, in data/ of a folder that
    examples/vision-tiny.yaml runs in; the other tests' stages go to tests/ there."""
    from kubetune_trainer.data.synthetic_images import make_digits

    folder = tmp_path_factory.mktemp("vision-tiny")
    paths = make_digits(folder / "data", seed=0, size=32)
    data = {"captions/train": paths["digits/captions-train.jsonl"],
            "captions/validation": paths["digits/captions-validation.jsonl"],
            "digits/train": paths["digits/train"], "digits/validation": paths["digits/validation.jsonl"]}
    return Trainer(data, folder / "tests")


def diffusion_run(trainer: Trainer, name: str, steps: int, lr: float, **extra: Any) -> dict[str, Any]:
    return trainer.stage_run(name, "diffusion", "imageCaption", "captions",
                             hp={**HP, "maxSteps": steps, "learningRate": lr, **extra.pop("hp", {})},
                             diffusion={**DIFFUSION, **extra.pop("diffusion", {})}, **extra)


@pytest.fixture(scope="module")
def example(digits: Trainer) -> tuple[Path, float]:
    """examples/vision-tiny.yaml run as a user runs it (`kubetune run`), and the CPU seconds it took: its two jobs,
    vision-tiny (a ResNet from model.init learns the digits, 300 steps) and diffusion-tiny (the chain: a CLIP from
    model.init on the captioned digits, 150 steps, whose text tower conditions a UNet built from diffusion.unet,
    600 steps in full; the operator renders the same textEncoderUri)."""
    folder = digits.root.parent
    seconds = run_example("vision-tiny", folder)
    return folder / "runs", seconds


@pytest.fixture(scope="module")
def encoder(example: tuple[Path, float]) -> Path:
    """The example's clip stage: the text tower the diffusion stage reads."""
    return example[0] / "diffusion-tiny" / "captions"


@pytest.fixture(scope="module")
def learned(example: tuple[Path, float]) -> tuple[Path, dict[str, Any], float]:
    """The example's diffusion stage: the learning proof and the base of the tuning tests."""
    out = example[0] / "diffusion-tiny" / "generate"
    metrics = json.loads((out / "metrics.json").read_text())
    report("diffusion (examples/vision-tiny.yaml: clip -> diffusion, UNet from diffusion.unet, full)", metrics)
    return out, metrics, example[1]


@pytest.fixture(scope="module")
def classifier(example: tuple[Path, float]) -> Path:
    """The example's imageClassification stage, a ResNet from model.init on the digits (as the proof of
    tests/trainer/test_image_classification.py): it reads the digits the pipeline draws."""
    return example[0] / "vision-tiny" / "digits"


@pytest.mark.slow
def test_the_example_s_classifier_learns_the_digits(classifier: Path) -> None:
    metrics = json.loads((classifier / "metrics.json").read_text())
    assert metrics["before"]["accuracy"] <= 0.2 and metrics["after"]["accuracy"] >= 0.95, metrics
    assert (classifier / "confusion_matrix.png").exists() and (classifier / "preprocessor_config.json").exists()


def decoded(path: Path) -> Image.Image:
    with Image.open(path) as png:
        png.load()
        assert png.format == "PNG" and png.mode == "RGB"
        return png.copy()


@pytest.mark.slow
def test_clip_then_diffusion_learns_to_draw_the_digit_a_caption_asks_for(
    learned: tuple[Path, dict[str, Any], float], classifier: Path,
) -> None:
    out, metrics, cpu_seconds = learned
    before, after = metrics["before"]["evalLoss"], metrics["after"]["evalLoss"]
    assert metrics["primary"] == "evalLoss" and metrics["heldOutExamples"] == 359
    assert after <= 0.6 * before, (before, after)  # the held-out loss falls by at least 40%

    # the stage folder is a diffusers pipeline that the plain loader opens
    from diffusers import DiffusionPipeline
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from kubetune_trainer.data.synthetic_images import digit_caption
    from kubetune_trainer.recipes.diffusion import generate

    pipe: Any = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "IFPipeline" and pipe.unet.config.sample_size == 8
    assert pipe.text_encoder.config.hidden_size == TEXT_WIDTH
    pipe.set_progress_bar_config(disable=True)
    captions = [digit_caption(d) for d in range(10)]  # the held-out captions
    started = time.process_time()
    samples = generate(pipe, captions, PER_DIGIT, INFERENCE_STEPS, GUIDANCE, seed=100)
    sampling = time.process_time() - started

    model, processor = AutoModelForImageClassification.from_pretrained(classifier).eval(), \
        AutoImageProcessor.from_pretrained(classifier)
    with torch.no_grad():
        pixels = processor(images=[im for row in samples for im in row], return_tensors="pt")["pixel_values"]
        predicted = model(pixel_values=pixels).logits.argmax(-1).tolist()
    wanted = [d for d in range(10) for _ in range(PER_DIGIT)]
    accuracy = sum(p == w for p, w in zip(predicted, wanted, strict=True)) / len(wanted)
    print(f"\ndiffusion: held-out evalLoss {before:.4f} -> {after:.4f} ({1 - after / before:.0%} lower); classifier "
          f"reads the asked digit in {accuracy:.2f} of {len(wanted)} samples (chance 0.1); {cpu_seconds / 60:.1f} CPU "
          f"minutes for the whole example (three stages, with their evaluations), {sampling / 60:.1f} sampling")
    assert accuracy >= 0.5  # the bar; its goal is 0.8

    # the sample grids: a row per caption, samplesPerCaption (4) columns, cells scaled up to 64 pixels
    assert sorted(metrics["sample"]["captions"]) == sorted(captions)  # the ten held-out captions, as first seen
    for name in ("samples_before.png", "samples_after.png"):
        grid = decoded(out / name)
        assert grid.size == (4 * 66 + 2, 10 * 66 + 2)
    assert decoded(out / "samples_before.png").tobytes() != decoded(out / "samples_after.png").tobytes()


def unet_weights(pipeline: Path) -> dict[str, torch.Tensor]:
    return weights(pipeline / "unet")


def test_full_fine_tuning_of_a_pipeline_changes_every_unet_weight_and_keeps_the_text_encoder(
    digits: Trainer, learned: tuple[Path, dict[str, Any], float],
) -> None:
    base, _, _ = learned
    run = diffusion_run(digits, "full", 3, 1e-3, model=base, diffusion={"unet": None, "samplesPerCaption": 1,
                                                                        "inferenceSteps": 2})
    metrics = digits.train(run)
    out = Path(run["outputUri"])
    before, after = unet_weights(base), unet_weights(out)
    assert after.keys() == before.keys()
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    assert all(torch.equal(a, b) for a, b in zip(weights(base / "text_encoder").values(),
                                                  weights(out / "text_encoder").values(), strict=True))
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "IFPipeline"
    assert metrics["trainableParameters"] == sum(t.numel() for t in before.values())


def test_lora_trains_only_adapters_on_the_unet_attention(
    digits: Trainer, learned: tuple[Path, dict[str, Any], float],
) -> None:
    base, _, _ = learned
    run = diffusion_run(digits, "lora", 10, 1e-3, model=base, merge=True,
                        tuning={"method": "lora", "lora": {"r": 4, "alpha": 4, "dropout": 0.0}},
                        diffusion={"unet": None, "samplesPerCaption": 1, "inferenceSteps": 2})
    metrics = digits.train(run)
    out = Path(run["outputUri"])
    adapter = weights(out)  # pytorch_lora_weights.safetensors, as diffusers writes a LoRA
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / "unet").exists()
    assert adapter and all(".lora." in k or "lora_" in k for k in adapter)
    assert {k.split(".lora")[0].rsplit(".", 1)[-1] for k in adapter} <= {"to_q", "to_k", "to_v", "0"}
    assert metrics["trainableParameters"] == sum(t.numel() for t in adapter.values())

    before, merged = unet_weights(base), unet_weights(out / "merged")
    assert merged.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    attention = {k for k in before if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))}
    # q, k, v, out x self- and cross-attention x 4 transformer blocks (the 4x4 level down, the middle, 2 up)
    assert changed == attention and len(attention) == 4 * 2 * 4
    from diffusers import DiffusionPipeline

    assert DiffusionPipeline.from_pretrained(out / "merged").unet.config.sample_size == 8
    assert metrics["after"]["evalLoss"] > 0 and (out / "samples_after.png").exists()


def test_bad_rows_stop_the_stage_before_training(digits: Trainer, encoder: Path, tmp_path: Path) -> None:
    train = digits.data["captions/train"]
    rows = train.read_text().splitlines()[:30]
    (train.parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    rows[2] = json.dumps({"image": "broken.png", "caption": "a handwritten two"})
    rows[5] = json.dumps({"image": "train/0/0000.png", "caption": ""})
    bad = train.parent / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    run = diffusion_run(digits, "bad", 5, 1e-3, textEncoderUri=str(encoder), out=tmp_path / "bad")
    run["dataset"]["uri"] = str(bad)
    code, metrics = digits.run(run)
    error = (tmp_path / "bad" / "error.txt").read_text()
    assert code == 1 and metrics is None
    assert "line 3: image file broken.png cannot be decoded" in error and 'line 6: "caption" is empty' in error
    assert not (tmp_path / "bad" / "model_index.json").exists() and not list((tmp_path / "bad").glob("checkpoint-*"))


def test_a_stage_without_a_pipeline_or_unet_sizes_names_the_fix(digits: Trainer, encoder: Path, tmp_path: Path) -> None:
    run = diffusion_run(digits, "no-unet", 5, 1e-3, textEncoderUri=str(encoder), out=tmp_path / "no-unet",
                        diffusion={"unet": None})
    code, _ = digits.run(run)
    assert code == 1
    assert "set diffusion.unet to build a UNet from scratch" in (tmp_path / "no-unet" / "error.txt").read_text()


@pytest.fixture(scope="module")
def stable_diffusion(encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A StableDiffusionPipeline folder of random tiny parts (a VAE to 8x8x4 latents of 16x16 images), with the
    clip stage's text tower: what a Stable Diffusion checkpoint looks like, minus its size and its training."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64],
                                layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=16)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", clip_sample=False)  # Stable Diffusion 2's
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel.from_pretrained(encoder),
                                   tokenizer=AutoTokenizer.from_pretrained(encoder), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = tmp_path_factory.mktemp("sd") / "pipeline"
    pipe.save_pretrained(out)
    return out


def test_a_stable_diffusion_pipeline_trains_lora_on_its_latents(digits: Trainer, stable_diffusion: Path) -> None:
    run = diffusion_run(digits, "sd-lora", 4, 1e-3, model=stable_diffusion, merge=True,
                        tuning={"method": "lora", "lora": {"r": 4}},
                        diffusion={"unet": None, "snrGamma": 5.0, "samplesPerCaption": 1, "inferenceSteps": 2})
    metrics = digits.train(run)
    out = Path(run["outputUri"])
    merged = json.loads((out / "merged" / "model_index.json").read_text())
    assert merged["_class_name"] == "StableDiffusionPipeline" and merged["vae"] == ["diffusers", "AutoencoderKL"]
    before, after = unet_weights(stable_diffusion), unet_weights(out / "merged")
    assert {k for k in before if not torch.equal(before[k], after[k])} == {
        k for k in before if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))}
    assert weights(stable_diffusion / "vae").keys() == weights(out / "merged" / "vae").keys()
    assert decoded(out / "samples_after.png").size == (66 + 2, 10 * 66 + 2)  # 16x16 images in 64-pixel cells
    assert metrics["before"]["evalLoss"] > 0 and metrics["after"]["evalLoss"] > 0
