"""kubetune serve on a clip stage's folder: held-out shape images get their shape back as the zero-shot label
(as often as the trainer's own zeroShotAccuracy says, over v1 and v2), texts and images get unit-length
embeddings of the model's projection size, equal to the model's own, and bad bodies a 400 with a message while
the server keeps serving. The CLIP is trained here from model.init on the generated captioned shapes (a short
version of tests/trainer/test_clip.py)."""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from serving_helpers import Server  # noqa: E402
from trainer_helpers import Trainer  # noqa: E402

pytestmark = pytest.mark.slow  # a few minutes of training before the server starts

# As tests/trainer/test_clip.py: both towers 2 blocks of width 64, 32x32 images in 8x8 patches, a 400-token BPE.
CLIP = {"architecture": "clip", "hiddenSize": 64, "numLayers": 2, "numHeads": 4, "imageSize": 32, "patchSize": 8,
        "tokenizer": {"train": {"vocabSize": 400}}}
HP = {"maxLength": None, "batchSize": 64, "loggingSteps": 50, "saveSteps": 100000, "maxSteps": 300,
      "learningRate": 2e-3, "warmupRatio": 0.05, "lrSchedulerType": "cosine"}
SHAPES = ["circle", "square", "triangle", "cross"]
HELD_OUT = 64


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """(the clip stage's folder, the held-out rows' file, its metrics.json)."""
    from kubetune_trainer.data.synthetic_images import make_shapes

    paths = make_shapes(tmp_path_factory.mktemp("shapes"), seed=0, size=32, n_train=1000, n_val=HELD_OUT)
    t = Trainer({"shapes/train": paths["shapes/train.jsonl"], "shapes/validation": paths["shapes/validation.jsonl"]},
                tmp_path_factory.mktemp("runs"))
    run = t.stage_run("shapes", "clip", "imageCaption", "shapes", init=CLIP, hp=HP,
                      clip={"promptTemplate": "a photo of a {label}"})
    metrics = t.train(run)
    return Path(run["outputUri"]), paths["shapes/validation.jsonl"], metrics


@pytest.fixture(scope="module")
def server(stage: tuple[Path, Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    started = Server(str(stage[0]), log=tmp_path_factory.mktemp("logs") / "serve.log")
    try:
        started.wait_ready()
        yield started.http
    finally:
        started.stop()


def held_out(stage: tuple[Path, Path, dict[str, Any]]) -> list[tuple[str, str]]:
    """(base64 PNG, shape) of every held-out image."""
    index = stage[1]
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    return [(base64.b64encode((index.parent / r["image"]).read_bytes()).decode(), r["label"]) for r in rows]


def test_held_out_shapes_get_their_zero_shot_label(server: httpx.Client,
                                                   stage: tuple[Path, Path, dict[str, Any]]) -> None:
    _, _, metrics = stage
    images = held_out(stage)
    assert metrics["zeroShot"] == {"promptTemplate": "a photo of a {label}"}  # what the server reads
    r = server.post("/v1/models/shapes:predict", json={
        "instances": [{"image": {"b64": b64}} for b64, _ in images], "labels": SHAPES})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    right = 0
    for prediction, (_, shape) in zip(predictions, images, strict=True):
        labels = prediction["labels"]
        assert sorted(x["label"] for x in labels) == sorted(SHAPES)
        scores = [x["score"] for x in labels]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-5)
        right += labels[0]["label"] == shape
    accuracy = right / len(images)
    print(f"\nserved zero-shot accuracy {accuracy:.3f}, the trainer's {metrics['after']['zeroShotAccuracy']:.3f}")
    assert accuracy >= 0.9
    # the same images, labels and prompt as the trainer's held-out figure: the same answer
    assert accuracy == pytest.approx(metrics["after"]["zeroShotAccuracy"], abs=1.5 / len(images))

    # v2: the same best labels; a prompt template of the request's own is used instead of the stage's
    body = {"inputs": [{"name": "image", "shape": [8], "datatype": "BYTES", "data": [b64 for b64, _ in images[:8]]},
                       {"name": "labels", "shape": [4], "datatype": "BYTES", "data": SHAPES}]}
    r = server.post("/v2/models/shapes/infer", json=body)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["label"]["data"] == [p["labels"][0]["label"] for p in predictions[:8]]
    assert outputs["scores"]["shape"] == [8, 4] and outputs["image_embedding"]["shape"][0] == 8
    assert outputs["score"]["data"] == pytest.approx([p["labels"][0]["score"] for p in predictions[:8]], abs=1e-4)
    other = server.post("/v2/models/shapes/infer", json={**body, "parameters": {"promptTemplate": "the {label} is"}})
    assert other.status_code == 200, other.text
    assert {o["name"]: o for o in other.json()["outputs"]}["scores"]["data"] != pytest.approx(
        outputs["scores"]["data"], abs=1e-4)


def test_texts_and_images_get_the_models_own_embeddings(server: httpx.Client,
                                                        stage: tuple[Path, Path, dict[str, Any]]) -> None:
    import torch
    from kubetune_trainer.recipes.clip import embed_texts
    from transformers import CLIPModel, CLIPProcessor

    out = stage[0]
    (b64, _), *_ = held_out(stage)
    r = server.post("/v1/models/shapes:predict", json={"instances": [
        "a red circle on the left", {"image": {"b64": b64}}, {"text": "a photo of a cross"}]})
    assert r.status_code == 200, r.text
    first, image, last = (torch.tensor(p["embedding"]) for p in r.json()["predictions"])
    assert "labels" not in r.json()["predictions"][1]  # no candidate labels: an embedding only

    model, processor = CLIPModel.from_pretrained(out).eval(), CLIPProcessor.from_pretrained(out)
    dim = model.config.projection_dim
    assert first.shape == image.shape == last.shape == (dim,)
    assert [float(e.norm()) for e in (first, image, last)] == pytest.approx([1, 1, 1], abs=1e-4)
    expected = embed_texts(model, processor, ["a red circle on the left", "a photo of a cross"])
    assert torch.allclose(torch.stack([first, last]), expected, atol=1e-4)

    v2 = server.post("/v2/models/shapes/infer", json={"inputs": [
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a red circle on the left", "a photo of a cross"]}]})
    assert v2.status_code == 200, v2.text
    (output,) = v2.json()["outputs"]
    assert output["name"] == "text_embedding" and output["datatype"] == "FP32" and output["shape"] == [2, dim]
    assert torch.allclose(torch.tensor(output["data"]).reshape(2, dim), expected, atol=1e-4)


def test_bad_bodies_get_a_400_and_the_server_keeps_serving(server: httpx.Client,
                                                           stage: tuple[Path, Path, dict[str, Any]]) -> None:
    (b64, shape), *_ = held_out(stage)
    bad = [
        ("/v1/models/shapes:predict", {"instances": [{"text": "a circle", "image": {"b64": b64}}]}, "not both"),
        ("/v1/models/shapes:predict", {"instances": [{"image": {"b64": b64}}], "labels": "circle"}, "labels"),
        ("/v1/models/shapes:predict", {"instances": [{"image": {"b64": "aGVsbG8="}}], "labels": SHAPES},
         "cannot be decoded"),
        ("/v1/models/shapes:predict", {"instances": [{"image": {"b64": b64}}], "labels": SHAPES,
                                       "promptTemplate": "a photo"}, "{label}"),
        ("/v1/models/shapes:predict", {"instances": [{"score": 1}]}, "each instance is a text"),
        ("/v2/models/shapes/infer", {"inputs": [{"name": "labels", "shape": [1], "datatype": "BYTES",
                                                 "data": ["circle"]}]}, "text and/or image"),
        ("/v2/models/shapes/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                                                {"name": "labels", "shape": [1], "datatype": "BYTES",
                                                 "data": ["circle"]}]}, "send an image input"),
    ]
    for path, body, words in bad:
        r = server.post(path, json=body)
        assert r.status_code == 400, (body, r.text)
        assert words in r.text, r.text
    r = server.post("/v1/models/shapes:predict", json={"instances": [{"image": {"b64": b64}, "labels": SHAPES}]})
    assert r.status_code == 200, r.text
    assert server.get("/v2/health/ready").status_code == 200
