"""imageClassification: a ResNet built from model.init learns the generated digits; LoRA on a ViT
trains only its adapters and the classifier, a full run every weight; a new head follows the data's
labels; bad images stop the stage before training; the confusion matrix is a real PNG; 2 processes (plain
data parallel and DeepSpeed ZeRO-2) follow the loss curve of 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from trainer_helpers import Trainer, report, weights

# Image stages take no maxLength (a text-only hyperparameter): clear the text tests' default.
HP = {"maxLength": None, "batchSize": 32, "loggingSteps": 25, "saveSteps": 100000}
RESNET = {"architecture": "resnet", "hiddenSize": 16, "numLayers": 3, "imageSize": 32}
VIT = {"architecture": "vit", "hiddenSize": 32, "numLayers": 2, "numHeads": 4, "imageSize": 32, "patchSize": 8}
# Digits change class when mirrored; crops keep most of the digit.
DIGITS_AUGMENT = {"horizontalFlip": False, "cropScale": 0.8}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubetune_trainer.data.synthetic_images import make_digits

    return make_digits(tmp_path_factory.mktemp("digits"), seed=0, size=32)


@pytest.fixture(scope="module")
def images(digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    return Trainer(digits, tmp_path_factory.mktemp("image-runs"))


def classify(trainer: Trainer, name: str, steps: int, lr: float, **extra: Any) -> dict[str, Any]:
    return trainer.stage_run(name, "imageClassification", "imageLabel", "digits",
                             hp={**HP, "maxSteps": steps, "learningRate": lr, **extra.pop("hp", {})},
                             imageClassification=DIGITS_AUGMENT, **extra)


@pytest.fixture(scope="module")
def vit(images: Trainer) -> Path:
    """A small ViT trained from scratch on the digits (full, 40 steps): the base of the tuning tests."""
    run = classify(images, "vit", 40, 3e-3, init=VIT)
    images.train(run)
    return Path(run["outputUri"])


@pytest.mark.slow
def test_resnet_from_scratch_learns_the_digits(images: Trainer) -> None:
    run = classify(images, "resnet", 200, 3e-3, init=RESNET,
                   hp={"warmupRatio": 0.05, "lrSchedulerType": "cosine"})
    # as examples/vision-tiny.yaml: ImageFolder training rows (labels "0".."9"), JSONL held-out rows (labels 0..9)
    run["dataset"]["validationUri"] = str(images.data["digits/validation.jsonl"])
    metrics = images.train(run)
    report("imageClassification (resnet from model.init, full)", metrics)
    out = Path(run["outputUri"])
    assert metrics["primary"] == "accuracy" and metrics["heldOutExamples"] == 359
    assert metrics["before"]["accuracy"] <= 0.2  # chance is 0.1
    assert metrics["after"]["accuracy"] >= 0.95
    assert metrics["after"]["top5Accuracy"] >= metrics["after"]["accuracy"]
    assert {"accuracy", "accuracyBefore", "top5Accuracy", "top5AccuracyBefore"} <= set(metrics["metrics"])

    # what the stage wrote loads with the Auto classes, labels named
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {i: str(i) for i in range(10)} and model.config.label2id["7"] == 7
    assert AutoImageProcessor.from_pretrained(out).size["shortest_edge"] == 32

    with Image.open(out / "confusion_matrix.png") as png:
        png.load()
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.width >= 10 * 24 and png.height >= 10 * 24  # ten rows and columns of cells


def test_lora_trains_only_adapters_and_the_head(images: Trainer, vit: Path) -> None:
    run = classify(images, "lora", 15, 5e-3, model=vit, merge=True,
                   tuning={"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    metrics = images.train(run)
    out = Path(run["outputUri"])
    adapter = weights(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj"} and config["modules_to_save"] == ["classifier"]
    lora = {k for k in adapter if "lora_" in k}
    assert {k.split(".")[-3] for k in lora} == {"q_proj", "v_proj"}
    assert all(adapter[k].abs().sum() > 0 for k in lora if "lora_B" in k)  # B starts at zero: it trained
    assert set(adapter) - lora == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}

    base, merged = weights(vit), weights(out / "merged")
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    # the files keep the checkpoint names of ViT's projections (query, value), which transformers 5 maps to q_proj, v_proj
    adapted = {k for k in base if k.endswith((".query.weight", ".value.weight"))}
    assert len(adapted) == 4 and changed == adapted | {"classifier.weight", "classifier.bias"}
    assert (out / "merged" / "preprocessor_config.json").exists() and (out / "confusion_matrix.png").exists()
    assert metrics["method"] == "lora" and set(metrics["after"]) == {"accuracy", "top5Accuracy"}


def test_full_tuning_changes_every_weight(images: Trainer, vit: Path) -> None:
    run = classify(images, "full", 5, 1e-3, model=vit)
    images.train(run)
    base, trained = weights(vit), weights(Path(run["outputUri"]))
    assert trained.keys() == base.keys()
    assert [k for k in base if torch.equal(base[k], trained[k])] == []


def test_a_classifier_gets_a_new_head_for_other_labels(images: Trainer, vit: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in images.data["digits/train.jsonl"].read_text().splitlines()][:64]
    data = images.data["digits/train.jsonl"].parent / "parity.jsonl"
    data.write_text("".join(json.dumps({"image": r["image"], "label": ["even", "odd"][r["label"] % 2]}) + "\n"
                            for r in rows))
    run = classify(images, "parity", 2, 1e-3, model=vit, validation=False)
    run["dataset"]["uri"] = str(data)
    metrics = images.train(run)
    out = Path(run["outputUri"])
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "even", "1": "odd"} and config["label2id"] == {"even": 0, "odd": 1}
    assert weights(out)["classifier.weight"].shape == (2, VIT["hiddenSize"])
    assert metrics["before"] is None  # no held-out rows, no figures


def test_bad_images_stop_the_stage_before_training(images: Trainer, tmp_path: Path) -> None:
    train = images.data["digits/train.jsonl"]
    rows = train.read_text().splitlines()[:20]
    (train.parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    rows[3] = json.dumps({"image": "broken.png", "label": 1})
    rows[7] = json.dumps({"image": "train/1/nowhere.png", "label": 1})
    bad = train.parent / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    run = classify(images, "bad", 5, 1e-3, init=RESNET, out=tmp_path / "bad")
    run["dataset"]["uri"] = str(bad)
    code, metrics = images.run(run)
    error = (tmp_path / "bad" / "error.txt").read_text()
    assert code == 1 and metrics is None
    assert "line 4: image file broken.png cannot be decoded" in error
    assert "line 8: image file train/1/nowhere.png does not exist" in error
    assert not list((tmp_path / "bad").glob("checkpoint-*")) and not (tmp_path / "bad" / "model.safetensors").exists()


def test_qlora_trains_adapters_on_a_4bit_base_and_merges(images: Trainer, vit: Path) -> None:
    run = classify(images, "qlora", 5, 5e-3, model=vit, merge=True, tuning={"method": "qlora", "lora": {"r": 4}})
    metrics = images.train(run)
    out = Path(run["outputUri"])
    adapter = weights(out)
    assert {k.split(".")[-3] for k in adapter if "lora_" in k} == {"q_proj", "v_proj"}
    assert {k for k in adapter if "lora_" not in k} == {"base_model.model.classifier.weight",
                                                        "base_model.model.classifier.bias"}
    merged = weights(out / "merged")  # merged into the full-precision base: a plain model again
    assert merged.keys() == weights(vit).keys() and all(t.dtype == torch.float32 for t in merged.values())
    assert metrics["method"] == "qlora" and metrics["after"] is not None


def test_a_class_left_with_one_training_example_by_the_split_is_refused() -> None:
    from kubetune_trainer.recipes.image_classification import check_classes

    a, b = {"label": "a"}, {"label": "b"}
    with pytest.raises(ValueError, match="classes b have fewer than 2 training examples after the held-out rows"):
        check_classes([a, a, b], [b])
    assert check_classes([a, a, b, b], [{"label": "c"}]) == ["a", "b", "c"]  # a held-out-only class is scored (wrong)


# Two processes x 16 images against one x 32, same seed, a ConvNeXt (LayerNorm; see BATCHNORM_TOLERANCE for ResNet):
# the measured curves differ by at most 2.4e-7 (one float32 step at these losses), the order in which the gradient
# all-reduce sums; ZeRO-3 measured the same (4.8e-7). The tolerance leaves room for Adam to magnify such differences
# on other CPUs, and stays far below what a fault gives: other batches (~0.1), or the loss multiplied by the number
# of processes (2.3 above: transformers' Trainer does that to a model whose forward takes **kwargs, as ResNet's
# does, expecting a loss summed over the global batch; the recipe turns it off).
LOSS_TOLERANCE = 1e-4
# ResNet's BatchNorm normalises each process's 16 images, not all 32 (plain DDP, no SyncBatchNorm), so its curves
# drift apart (measured 0.11 by the sixth step); at the first step, before any update, only those statistics differ
# (measured 0.016).
BATCHNORM_TOLERANCE = 0.05
CONVNEXT = {"architecture": "convnext", "hiddenSize": 32, "numLayers": 2, "imageSize": 32, "patchSize": 8}
MULTI_STEPS = 6


def curve(out: Path) -> list[float]:
    state = json.loads((out / f"checkpoint-{MULTI_STEPS}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def multi_process_run(images: Trainer, name: str, init: dict[str, Any], nproc: int,
                      zero: int | None = None) -> dict[str, Any]:
    """6 steps from model.init with a constant learning rate; crops keep the whole image (each process draws its own)."""
    return images.stage_run(name, "imageClassification", "imageLabel", "digits", init=init, validation=False,
                            imageClassification={"horizontalFlip": False, "cropScale": 1.0},
                            hp={**HP, "maxSteps": MULTI_STEPS, "batchSize": 32 // nproc, "learningRate": 3e-3,
                                "loggingSteps": 1, "saveSteps": MULTI_STEPS, "warmupRatio": 0.0,
                                "lrSchedulerType": "constant"},
                            distributed={"deepspeed": {"zeroStage": zero}} if zero else {})


@pytest.fixture(scope="module")
def one_process_curves(images: Trainer) -> dict[str, list[float]]:
    curves = {}
    for init in (CONVNEXT, RESNET):
        run = multi_process_run(images, f"one-process-{init['architecture']}", init, 1)
        images.train(run)
        curves[init["architecture"]] = curve(Path(run["outputUri"]))
    return curves


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("zero", [None, 2], ids=["gloo", "zero2"])
def test_two_processes_follow_the_single_process_loss_curve(images: Trainer, one_process_curves: dict[str, list[float]],
                                                            zero: int | None) -> None:
    run = multi_process_run(images, f"two-processes-{zero}", CONVNEXT, 2, zero)
    done = images.subprocess(run, nproc=2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "worldSize=2" in done.stderr
    one, two = one_process_curves["convnext"], curve(Path(run["outputUri"]))
    print(f"\nimageClassification 2 processes (zero={zero}): {two}\n1 process: {one}")
    assert len(two) == len(one) == MULTI_STEPS
    assert max(abs(a - b) for a, b in zip(two, one, strict=True)) < LOSS_TOLERANCE
    assert two[-1] < two[0]
    from transformers import AutoModelForImageClassification

    AutoModelForImageClassification.from_pretrained(run["outputUri"])  # one whole model, under ZeRO-2 too


@pytest.mark.slow
@pytest.mark.distributed
def test_resnet_on_two_processes_counts_its_loss_once(images: Trainer, one_process_curves: dict[str, list[float]]) -> None:
    """ResNet's forward takes **kwargs, so transformers' Trainer would scale its loss (and gradients) by the number of
    processes; the recipe turns that off. BatchNorm keeps the curves from matching exactly (see BATCHNORM_TOLERANCE)."""
    run = multi_process_run(images, "two-processes-resnet", RESNET, 2)
    done = images.subprocess(run, nproc=2)
    assert done.returncode == 0, done.stderr[-4000:]
    one, two = one_process_curves["resnet"], curve(Path(run["outputUri"]))
    print(f"\nimageClassification resnet 2 processes: {two}\n1 process: {one}")
    assert abs(two[0] - one[0]) < BATCHNORM_TOLERANCE  # counted twice, it would be about 2.3 above
    assert two[-1] < two[0]
