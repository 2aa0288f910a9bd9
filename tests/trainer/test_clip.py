"""clip: a CLIP built from model.init learns the generated captioned shapes (text-to-image recall@1 and
zero-shot accuracy on held-out images), as examples/clip-tiny.yaml runs with `kubetune run`; what it writes
loads with CLIPModel and CLIPProcessor; LoRA and QLoRA train only the adapters on both towers' attention; bad
rows stop the stage before training; 2 processes (plain data parallel and DeepSpeed ZeRO-2) follow the loss
curve of 1."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.api import StageRun
from kubetune_trainer.recipes.clip import build, hold_logit_scale
from trainer_helpers import Trainer, report, run_example, weights

# Image stages take no maxLength (a text-only hyperparameter): clear the text tests' default.
HP = {"maxLength": None, "batchSize": 64, "loggingSteps": 100, "saveSteps": 100000}
# Both towers 2 blocks of width 64; 32x32 images in 8x8 patches; a 400-token BPE trained on the captions
# (examples/clip-tiny.yaml's model.init).
CLIP = {"architecture": "clip", "hiddenSize": 64, "numLayers": 2, "numHeads": 4, "imageSize": 32, "patchSize": 8,
        "tokenizer": {"train": {"vocabSize": 400}}}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """The captioned shapes as `python -m kubetune_trainer.data.synthetic` writes them (2,000 to train on, 256 held
    out) in data/ of a folder that examples/clip-tiny.yaml runs in; the other tests' stages go to tests/ there."""
    from kubetune_trainer.data.synthetic_images import make_shapes

    folder = tmp_path_factory.mktemp("clip-tiny")
    paths = make_shapes(folder / "data", seed=0, size=32, n_train=2000, n_val=256)
    data = {"shapes/train": paths["shapes/train.jsonl"], "shapes/validation": paths["shapes/validation.jsonl"]}
    return Trainer(data, folder / "tests")


def clip_run(trainer: Trainer, name: str, steps: int, lr: float, **extra: Any) -> dict[str, Any]:
    return trainer.stage_run(name, "clip", "imageCaption", "shapes",
                             hp={**HP, "maxSteps": steps, "learningRate": lr, "warmupRatio": 0.05,
                                 "lrSchedulerType": "cosine", **extra.pop("hp", {})}, **extra)


@pytest.fixture(scope="module")
def learned(shapes: Trainer) -> tuple[Path, dict[str, Any]]:
    """examples/clip-tiny.yaml run as a user runs it (`kubetune run`): CLIP from model.init (CLIP above), 1,200 steps
    in full on the shapes. The learning proof of the stage type and of the example, and the base of LoRA."""
    folder = shapes.root.parent
    run_example("clip-tiny", folder)
    out = folder / "runs" / "clip-tiny" / "shapes"
    metrics = json.loads((out / "metrics.json").read_text())
    report("clip (examples/clip-tiny.yaml: from model.init, full)", metrics)
    return out, metrics


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
    assert (out / "processor_config.json").exists() and (out / "tokenizer.json").exists()

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


def test_qlora_trains_adapters_on_a_4bit_base_and_merges(shapes: Trainer, learned: tuple[Path, dict[str, Any]]) -> None:
    import bitsandbytes as bnb

    base_dir, learned_metrics = learned
    run = clip_run(shapes, "qlora", 5, 1e-3, model=base_dir, merge=True, tuning={"method": "qlora", "lora": {"r": 4}})
    run_info = StageRun.model_validate(run)
    model, _ = build(run_info, [])
    assert isinstance(model.vision_model.encoder.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(model.text_model.encoder.layers[0].mlp.fc1, bnb.nn.Linear4bit)

    metrics = shapes.train(run)
    out = Path(run["outputUri"])
    adapter = weights(out)
    assert all("lora_" in k for k in adapter) and {k.split(".")[2] for k in adapter} == {"text_model", "vision_model"}
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # B starts at zero: it trained
    base, merged = weights(base_dir), weights(out / "merged")  # merged into the full-precision base
    assert merged.keys() == base.keys() and all(t.dtype == torch.float32 for t in merged.values())
    assert {k for k in base if not torch.equal(base[k], merged[k])} == {
        k for k in base if k.endswith((".q_proj.weight", ".v_proj.weight"))}
    # the 4-bit base (scored before training) ranks almost as the full-precision one it was quantized from
    assert metrics["before"]["textToImageRecallAt1"] >= learned_metrics["after"]["textToImageRecallAt1"] - 0.1
    assert metrics["method"] == "qlora" and metrics["after"]["textToImageRecallAt1"] >= 0.8


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


# 2 processes x 32 rows against 1 x 64, same seed: the measured curves differ by at most 4.8e-7 (one or two float32
# steps at these losses), the order in which the gradient all-reduce sums, with plain data parallel and ZeRO-2
# alike. The tolerance leaves room for Adam to magnify such differences on other CPUs, and stays far below what a
# fault gives: contrasting only each process's own 32 rows, or other batches, moves the loss by ~0.1 and more.
LOSS_TOLERANCE = 1e-4
MULTI_STEPS = 6


def curve(out: Path, steps: int) -> list[float]:
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def multi_process_run(shapes: Trainer, name: str, nproc: int, zero: int | None = None) -> dict[str, Any]:
    """CLIP from model.init, a constant learning rate, crops off (each process draws its own)."""
    return clip_run(shapes, name, MULTI_STEPS, 3e-3, init=CLIP, validation=False, clip={"cropScale": 1.0},
                    hp={"batchSize": 64 // nproc, "loggingSteps": 1, "saveSteps": MULTI_STEPS, "warmupRatio": 0.0,
                        "lrSchedulerType": "constant"},
                    distributed={"deepspeed": {"zeroStage": zero}} if zero else {})


@pytest.fixture(scope="module")
def one_process_curve(shapes: Trainer) -> list[float]:
    run = multi_process_run(shapes, "one-process", 1)
    shapes.train(run)
    return curve(Path(run["outputUri"]), MULTI_STEPS)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("zero", [None, 2], ids=["gloo", "zero2"])
def test_two_processes_follow_the_single_process_loss_curve(shapes: Trainer, one_process_curve: list[float],
                                                            zero: int | None) -> None:
    """2 processes x 32 rows contrast the same global batch as 1 x 64 (embeddings gathered across processes),
    with plain data parallel and under DeepSpeed ZeRO-2 (whose start-up broadcast takes logit_scale only as a
    1-element tensor), so the loss curves agree; what the stage writes is a CLIPModel with a trained temperature."""
    run = multi_process_run(shapes, f"two-processes-{zero}", 2, zero)
    done = shapes.subprocess(run, nproc=2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "worldSize=2" in done.stderr
    two = curve(Path(run["outputUri"]), MULTI_STEPS)
    print(f"\nclip 2 processes (zero={zero}): {two}\n1 process: {one_process_curve}")
    assert len(two) == len(one_process_curve) == MULTI_STEPS
    assert max(abs(a - b) for a, b in zip(two, one_process_curve, strict=True)) < LOSS_TOLERANCE
    assert two[-1] < two[0]

    from transformers import CLIPModel

    for folder in (Path(run["outputUri"]), Path(run["outputUri"]) / f"checkpoint-{MULTI_STEPS}"):
        assert weights(folder)["logit_scale"].shape == ()  # CLIPModel's own shape, in checkpoints too
    model = CLIPModel.from_pretrained(run["outputUri"])
    assert model.logit_scale.shape == () and model.logit_scale.item() != pytest.approx(model.config.logit_scale_init_value)


def test_held_logit_scale_keeps_the_clip_model_state_dict() -> None:
    """A model whose temperature is held as a 1-element tensor scores as before, writes CLIPModel's 0-dimensional
    logit_scale, and loads such a state dict (a resumed run loading its checkpoint)."""
    from transformers import CLIPConfig, CLIPModel

    tower = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    config = CLIPConfig(text_config={**tower, "vocab_size": 50}, vision_config={**tower, "image_size": 16,
                                                                                  "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    plain = CLIPModel(config).eval()
    held = CLIPModel(config).eval()
    held.load_state_dict(plain.state_dict())
    hold_logit_scale(held)
    assert held.logit_scale.shape == (1,) and held.logit_scale.requires_grad
    inputs = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]), "pixel_values": torch.randn(2, 3, 16, 16)}
    with torch.no_grad():
        assert torch.equal(held(**inputs, return_loss=True).loss, plain(**inputs, return_loss=True).loss)
    assert held.state_dict()["logit_scale"].shape == ()
    saved = plain.state_dict()
    saved["logit_scale"] = torch.tensor(1.5)
    held.load_state_dict(saved)
    assert held.logit_scale.shape == (1,) and held.logit_scale.item() == 1.5


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_on_two_processes_is_refused_naming_the_fix(shapes: Trainer, tmp_path: Path) -> None:
    run = clip_run(shapes, "zero3", 2, 1e-3, init=CLIP, validation=False, out=tmp_path / "zero3",
                   distributed={"deepspeed": {"zeroStage": 3}}, hp={"batchSize": 16})
    done = shapes.subprocess(run, nproc=2)
    assert done.returncode != 0
    assert "set distributed.deepspeed.zeroStage to 2" in (tmp_path / "zero3" / "error.txt").read_text()
    assert not list((tmp_path / "zero3").glob("checkpoint-*"))
