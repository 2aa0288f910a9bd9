"""kubetune serve on a diffusion stage's pipeline folder: a prompt gets a PNG back over v1 and v2, the same
seed the same image, and a bad request a 400 with a message (the stages are trained here: a tiny clip, then
a few steps of diffusion; what is served is the folder, not what it learned)."""

from __future__ import annotations

import base64
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")

from serving_helpers import Server  # noqa: E402
from trainer_helpers import Trainer  # noqa: E402

pytestmark = pytest.mark.slow

HP = {"maxLength": None, "batchSize": 32, "loggingSteps": 10, "saveSteps": 100000}
CLIP = {"architecture": "clip", "hiddenSize": 32, "numLayers": 1, "numHeads": 2, "imageSize": 16, "patchSize": 8,
        "tokenizer": {"train": {"vocabSize": 300}}}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_trainer.data.synthetic_images import make_digits

    paths = make_digits(tmp_path_factory.mktemp("digits"), seed=0, size=16)
    t = Trainer({"captions/train": paths["digits/captions-train.jsonl"]}, tmp_path_factory.mktemp("runs"))
    clip = t.stage_run("clip", "clip", "imageCaption", "captions", init=CLIP, hp={**HP, "maxSteps": 5})
    t.train(clip)
    run = t.stage_run("diffusion", "diffusion", "imageCaption", "captions", textEncoderUri=clip["outputUri"],
                      hp={**HP, "maxSteps": 5, "learningRate": 1e-3},
                      diffusion={"unet": {"sampleSize": 8, "blockOutChannels": [16, 32], "normNumGroups": 8},
                                 "inferenceSteps": 2, "samplesPerCaption": 1})
    t.train(run)
    return Path(run["outputUri"])


@pytest.fixture(scope="module")
def server(pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    started = Server(str(pipeline), log=tmp_path_factory.mktemp("logs") / "serve.log")
    try:
        started.wait_ready()
        yield started.http
    finally:
        started.stop()


def png(b64: str) -> bytes:
    from PIL import Image

    data = base64.b64decode(b64)
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.format == "PNG" and image.size == (8, 8) and image.mode == "RGB"
    return data


def test_a_prompt_gets_a_png_over_v1_and_the_same_seed_the_same_image(server: httpx.Client) -> None:
    body = {"instances": [{"prompt": "a handwritten seven", "seed": 3, "steps": 4, "guidanceScale": 2.0},
                          {"prompt": "a handwritten seven", "seed": 3, "steps": 4, "guidanceScale": 2.0},
                          {"prompt": "a handwritten seven", "seed": 4, "steps": 4, "guidanceScale": 2.0}]}
    r = server.post("/v1/models/diffusion:predict", json=body)
    assert r.status_code == 200, r.text
    images = [png(p["image"]["b64"]) for p in r.json()["predictions"]]
    assert images[0] == images[1] and images[0] != images[2]


def test_v2_takes_text_and_answers_image_bytes(server: httpx.Client) -> None:
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a handwritten one"]}]}
    r = server.post("/v2/models/diffusion/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "image" and out["datatype"] == "BYTES"
    png(out["data"][0])


def test_a_bad_request_gets_a_400_naming_the_problem(server: httpx.Client) -> None:
    r = server.post("/v1/models/diffusion:predict", json={"instances": [{"prompt": "a one", "steps": 0}]})
    assert r.status_code == 400 and "steps must be between 1 and" in r.text
    assert server.post("/v1/models/diffusion:predict", json={"instances": ["a one"]}).status_code == 200
