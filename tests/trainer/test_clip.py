"""clip: a CLIP built from model.init learns the generated captioned shapes (text-to-image recall@1 and
zero-shot accuracy on held-out images); what it writes loads with CLIPModel and CLIPProcessor; LoRA
trains only the adapters on both towers' attention; bad rows stop the stage before training."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import Trainer, report, weights

# Image stages take no maxLength (a text-only hyperparameter): clear the text tests' default.
HP = {"maxLength": None, "batchSize": 64, "loggingSteps": 100, "saveSteps": 100000}
# Both towers 2 blocks of width 64; 32x32 images in 8x8 patches; a 400-token BPE trained on the captions.
CLIP = {"architecture": "clip", "hiddenSize": 64, "numLayers": 2, "numHeads": 4, "imageSize": 32, "patchSize": 8,
        "tokenizer": {"train": {"vocabSize": 400}}}
STEPS = 1200


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    from kubetune_trainer.data.synthetic_images import make_shapes

    paths = make_shapes(tmp_path_factory.mktemp("shapes"), seed=0, size=32, n_train=2000, n_val=256)
    data = {"shapes/train": paths["shapes/train.jsonl"], "shapes/validation": paths["shapes/validation.jsonl"]}
    return Trainer(data, tmp_path_factory.mktemp("clip-runs"))


def clip_run(trainer: Trainer, name: str, steps: int, lr: float, **extra: Any) -> dict[str, Any]:
    return trainer.stage_run(name, "clip", "imageCaption", "shapes",
                             hp={**HP, "maxSteps": steps, "learningRate": lr, "warmupRatio": 0.05,
                                 "lrSchedulerType": "cosine", **extra.pop("hp", {})}, **extra)


@pytest.fixture(scope="module")
def learned(shapes: Trainer) -> tuple[Path, dict[str, Any]]:
    """CLIP from model.init, trained in full on the shapes: the learning proof and the base of LoRA."""
    run = clip_run(shapes, "init", STEPS, 2e-3, init=CLIP)
    metrics = shapes.train(run)
    report("clip (from model.init, full)", metrics)
    return Path(run["outputUri"]), metrics


@pytest.mark.slow
def test_clip_from_scratch_learns_captioned_shapes(learned: tuple[Path, dict[str, Any]]) -> None:
    out, metrics = learned
    before, after = metrics["before"], metrics["after"]
    assert metrics["primary"] == "textToImageRecallAt1" and metrics["heldOutExamples"] == 256
    # 8 batches of 32 held-out rows: chance recall@1 is 1/32 (a little more where captions repeat)
    assert before["textToImageRecallAt1"] <= 0.15 and before["zeroShotAccuracy"] <= 0.5  # chance 0.25
    assert after["textToImageRecallAt1"] >= 0.9 and after["imageToTextRecallAt1"] >= 0.9
    assert after["zeroShotAccuracy"] >= 0.9
    assert after["textToImageRecallAt5"] >= after["textToImageRecallAt1"]
    assert {"textToImageRecallAt1Before", "zeroShotAccuracy", "imageToTextRecallAt5"} <= set(metrics["metrics"])

    # what the stage wrote loads as a server would, and ranks the right caption first
    from transformers import CLIPModel, CLIPProcessor

    from kubetune_trainer.data.synthetic_images import draw_shape

    model, processor = CLIPModel.from_pretrained(out).eval(), CLIPProcessor.from_pretrained(out)
    ids = processor(text=["a red circle"], return_tensors="pt")["input_ids"][0]
    assert ids[-1] == processor.tokenizer.eos_token_id  # the text tower reads the caption at its end token
    image = draw_shape("circle", "blue", "left", 32, random.Random(7))  # a new draw
    labels = ["a blue circle on the left", "a blue square on the left", "a red circle on the right",
              "a yellow triangle at the top"]
    inputs = processor(text=labels, images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        best = model(**inputs).logits_per_image.argmax(dim=-1).item()
    assert labels[best] == "a blue circle on the left"


def test_lora_trains_only_adapters_on_both_towers(shapes: Trainer, learned: tuple[Path, dict[str, Any]]) -> None:
    base_dir, _ = learned
    run = clip_run(shapes, "lora", 10, 1e-3, model=base_dir, merge=True,
                   tuning={"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    metrics = shapes.train(run)
    out = Path(run["outputUri"])
    adapter = weights(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert all("lora_" in k for k in adapter)
    assert {k.split(".")[2] for k in adapter} == {"text_model", "vision_model"}  # base_model.model.<tower>
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # B starts at zero: it trained
    assert metrics["trainableParameters"] == sum(t.numel() for t in adapter.values())

    base, merged = weights(base_dir), weights(out / "merged")
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {k for k in base if k.endswith((".q_proj.weight", ".v_proj.weight"))}
    assert len(changed) == 2 * 2 * 2  # 2 projections x 2 blocks x 2 towers; logit_scale and all else kept
    assert (out / "merged" / "processor_config.json").exists() and (out / "merged" / "tokenizer.json").exists()
    assert metrics["method"] == "lora" and metrics["after"]["textToImageRecallAt1"] >= 0.8


def test_bad_rows_stop_the_stage_before_training(shapes: Trainer, tmp_path: Path) -> None:
    train = shapes.data["shapes/train"]
    rows = train.read_text().splitlines()[:40]
    (train.parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    rows[3] = json.dumps({"image": "broken.png", "caption": "a red circle"})
    rows[7] = json.dumps({"image": "train/nowhere.png", "caption": "a red circle"})
    rows[9] = json.dumps({"image": "train/00001.png", "caption": ""})
    bad = train.parent / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    run = clip_run(shapes, "bad", 5, 1e-3, init=CLIP, out=tmp_path / "bad")
    run["dataset"]["uri"] = str(bad)
    code, metrics = shapes.run(run)
    error = (tmp_path / "bad" / "error.txt").read_text()
    assert code == 1 and metrics is None
    assert "line 4: image file broken.png cannot be decoded" in error
    assert "line 8: image file train/nowhere.png does not exist" in error
    assert 'line 10: "caption" is empty' in error
    assert not list((tmp_path / "bad").glob("checkpoint-*")) and not (tmp_path / "bad" / "model.safetensors").exists()


LOSS_TOLERANCE = 1e-4  # as tests/trainer/test_distributed.py: summation order only


def curve(out: Path, steps: int) -> list[float]:
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_follow_the_single_process_loss_curve(shapes: Trainer) -> None:
    """2 processes x 32 rows contrast the same global batch as 1 x 64 (embeddings gathered across
    processes), so the loss curves agree; crops are off, as each process draws its own. (DeepSpeed
    is refused for clip on several processes: its start-up broadcast fails on the 0-dimensional
    logit_scale.)"""
    steps, runs = 6, {}
    for nproc in (1, 2):
        runs[nproc] = clip_run(shapes, f"gloo-{nproc}", steps, 3e-3, init=CLIP, validation=False,
                               clip={"cropScale": 1.0},
                               hp={"batchSize": 64 // nproc, "loggingSteps": 1, "saveSteps": steps,
                                   "warmupRatio": 0.0, "lrSchedulerType": "constant"})
    shapes.train(runs[1])
    done = shapes.subprocess(runs[2], nproc=2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "worldSize=2" in done.stderr
    one, two = curve(Path(runs[1]["outputUri"]), steps), curve(Path(runs[2]["outputUri"]), steps)
    print(f"\nclip 2 processes: {two}\n1 process:        {one}")
    assert len(one) == len(two) == steps
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < LOSS_TOLERANCE
    assert two[-1] < two[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_on_two_processes_is_refused_naming_the_fix(shapes: Trainer, tmp_path: Path) -> None:
    run = clip_run(shapes, "zero2", 2, 1e-3, init=CLIP, validation=False, out=tmp_path / "zero2",
                   distributed={"deepspeed": {"zeroStage": 2}}, hp={"batchSize": 16})
    done = shapes.subprocess(run, nproc=2)
    assert done.returncode != 0
    assert "leave distributed.deepspeed unset" in (tmp_path / "zero2" / "error.txt").read_text()
    assert not list((tmp_path / "zero2").glob("checkpoint-*"))
