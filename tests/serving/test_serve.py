"""kubetune serve: stage outputs trained here from tiny models answer real HTTP requests.

Each server is `kubetune serve` in its own process on a free port (KServe's ModelServer owns its
process: one FastAPI app, signal handlers, asyncio.run), started once the stages are trained:

- one tiny llama base with two LoRA adapters (one taught to answer "yes", the other "no") and a
  bottleneck adapter (taught " maybe") behind `--adapter`: each answers as itself, picked by
  "model", through /openai/v1/chat/completions and /openai/v1/completions;
- prompt-tuning, prefix-tuning and IA3 adapters on one server: each answers what its stage folder
  gives when loaded the way the trainer reloads it (peft's prompt learning under transformers 5
  needs kubetune's fix), and the prefix and IA3 adapters the "ok" they learned;
- a reward model trained to prefer "yes": v1 and v2 scores, equal to the trainer's own scoring;
- an image classifier (ResNet from model.init) trained on generated digits: a base64 digit image
  gets its label back with scores;
- bad bodies (not JSON, missing fields, unknown model, an image that is no image) get a 4xx with
  a message, and the next good request is answered; the errors show in /metrics.
"""

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
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from serving_helpers import Server  # noqa: E402
from trainer_helpers import TINY_INIT, Trainer  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # about a minute of training (seven tiny stages) before the servers start

HP = {"batchSize": 16, "maxLength": 32, "loggingSteps": 20, "saveSteps": 100000}
RESNET = {"architecture": "resnet", "hiddenSize": 16, "numLayers": 3, "imageSize": 32}
ANSWERS = {"yes": "yes", "no": "no"}  # LoRA adapter name -> the answer it learns


def _rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic corpus, and the puzzles' prompts with constant answers (one per adapter)."""
    from kubetune_trainer.data.synthetic import make_all
    from kubetune_trainer.data.synthetic_images import make_digits

    root = tmp_path_factory.mktemp("data")
    paths = make_all(root, seed=0, n_train=400, n_val=20)
    prompts = [json.loads(line)["prompt"] for line in paths["sft/train"].read_text().splitlines()]
    for name, answer in {**ANSWERS, "maybe": "maybe", "ok": "ok"}.items():
        paths[f"chat_{name}/train"] = _rows(root / f"chat_{name}.jsonl", [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": answer}]} for p in prompts])
        paths[f"plain_{name}/train"] = _rows(root / f"plain_{name}.jsonl",
                                             [{"prompt": p, "completion": f" {answer}"} for p in prompts])
    paths["prefer_yes/train"] = _rows(root / "prefer_yes.jsonl",
                                      [{"prompt": p, "chosen": " yes", "rejected": " no"} for p in prompts])
    paths.update(make_digits(root, seed=0, size=32))
    return paths


@pytest.fixture(scope="module")
def trained(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every stage the servers load: base, LoRA x2, bottleneck adapter, prompt tuning, reward, digits."""
    t = Trainer(data, tmp_path_factory.mktemp("runs"))
    out: dict[str, Path] = {}

    def train(name: str, *args: Any, **kwargs: Any) -> None:
        run = t.stage_run(name, *args, validation=False, **kwargs)
        t.train(run)
        out[name] = Path(run["outputUri"])

    train("base", "pretrain", "text", "pretrain", init=TINY_INIT, hp={**HP, "maxSteps": 30, "learningRate": 3e-3})
    lora = {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    for name in ANSWERS:
        train(name, "sft", "messages", f"chat_{name}", model=out["base"], tuning=lora,
              hp={**HP, "maxSteps": 40, "learningRate": 1e-2})
    train("maybe", "sft", "promptCompletion", "plain_maybe", model=out["base"],
          tuning={"method": "adapter", "adapter": {"reductionFactor": 2}}, hp={**HP, "maxSteps": 100, "learningRate": 3e-2})
    train("ok", "sft", "promptCompletion", "plain_ok", model=out["base"],
          tuning={"method": "promptTuning", "promptTuning": {"numVirtualTokens": 4}},
          hp={**HP, "maxSteps": 20, "learningRate": 1e-1})
    train("prefix", "sft", "promptCompletion", "plain_ok", model=out["base"],
          tuning={"method": "prefixTuning", "prefixTuning": {"numVirtualTokens": 8}},
          hp={**HP, "maxSteps": 60, "learningRate": 5e-2})
    train("ia3", "sft", "promptCompletion", "plain_ok", model=out["base"], tuning={"method": "ia3"},
          hp={**HP, "maxSteps": 60, "learningRate": 1e-1})
    train("reward", "reward", "preference", "prefer_yes", model=out["base"],
          hp={**HP, "maxSteps": 20, "learningRate": 3e-3})
    train("digits", "imageClassification", "imageLabel", "digits", init=RESNET,
          hp={**HP, "maxLength": None, "batchSize": 32, "maxSteps": 60, "learningRate": 3e-3},
          imageClassification={"horizontalFlip": False, "cropScale": 0.8})
    return out


@pytest.fixture(scope="module")
def servers(trained: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "lm": Server(str(trained["yes"]), "--adapter", f"no={trained['no']}", "--adapter", f"maybe={trained['maybe']}",
                     log=logs / "lm.log"),
        "prompt": Server(str(trained["ok"]), "--adapter", f"prefix={trained['prefix']}",
                         "--adapter", f"ia3={trained['ia3']}", log=logs / "prompt.log"),
        "reward": Server(str(trained["reward"]), log=logs / "reward.log"),
        "digits": Server(str(trained["digits"]), log=logs / "digits.log"),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def chat(server: Server, model: str, content: str, **extra: Any) -> httpx.Response:
    return server.http.post("/openai/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, **extra})


PROMPT = "z y x w last letter:"  # held out: the adapters never saw these letters in this order


def test_two_lora_adapters_on_one_base_each_answer_as_itself(servers: dict[str, Server]) -> None:
    lm = servers["lm"]
    listed = lm.http.get("/openai/v1/models").json()
    assert sorted(m["id"] for m in listed["data"]) == ["maybe", "no", "yes"]
    for name, answer in ANSWERS.items():
        reply = chat(lm, name, PROMPT)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "chat.completion" and body["model"] == name
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["message"]["content"].strip() == answer
        assert body["choices"][0]["finish_reason"] == "stop"  # it learned to end its turn
        assert body["usage"]["completion_tokens"] >= 1
    # and again in the other order: switching adapters on the shared base leaves no trace
    assert chat(lm, "yes", PROMPT).json()["choices"][0]["message"]["content"].strip() == "yes"


def test_bottleneck_adapter_answers_completions_beside_the_lora_adapters(servers: dict[str, Server]) -> None:
    lm = servers["lm"]
    reply = lm.http.post("/openai/v1/completions", json={"model": "maybe", "prompt": PROMPT, "max_tokens": 8,
                                                             "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"].strip() == "maybe"
    # v1 inference protocol on the same model
    v1 = lm.http.post("/v1/models/maybe:predict", json={"instances": [PROMPT]})
    assert v1.status_code == 200 and v1.json()["predictions"][0].strip() == "maybe"


@pytest.mark.parametrize("name", ["ok", "prefix", "ia3"], ids=["promptTuning", "prefixTuning", "ia3"])
def test_prompt_prefix_and_ia3_adapters_answer_as_their_stage_folders_do(
    name: str, servers: dict[str, Server], trained: dict[str, Path],
) -> None:
    """Each answers what its folder gives when the trainer reloads it (peft's prompt learning
    under transformers 5 needs models.generation_ready), all three on one server; the prefix and
    IA3 adapters answer the "ok" they learned, which the base does not."""
    from kubetune.api import StageRun
    from kubetune_trainer import evals, models
    from transformers import AutoTokenizer

    out = trained[name]
    run = StageRun.model_validate_json((out.parent / f"{name}.stagerun.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    expected = evals.generate(models.load_trained(run, out), tokenizer, [PROMPT], max_new_tokens=6)[0]
    reply = servers["prompt"].http.post("/openai/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 6,
                                                                     "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] == expected
    if name != "ok":  # prefix tuning and IA3 learn the answer; prompt tuning barely moves on this 30-step base,
        assert expected.strip() == "ok"  # so for it the reload is the proof


def test_reward_model_scores_texts_over_v1_and_v2(servers: dict[str, Server], trained: dict[str, Path]) -> None:
    from kubetune_trainer import evals
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = servers["reward"]
    pairs = [{"prompt": PROMPT, "completion": " yes"}, {"prompt": PROMPT, "completion": " no"}]
    v1 = reward.http.post("/v1/models/reward:predict", json={"instances": pairs})
    assert v1.status_code == 200, v1.text
    yes, no = v1.json()["predictions"]
    assert yes > no  # it learned its preference

    tokenizer = AutoTokenizer.from_pretrained(str(trained["reward"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(trained["reward"]), num_labels=1)
    texts = [PROMPT + " yes" + tokenizer.eos_token, PROMPT + " no" + tokenizer.eos_token]
    assert [yes, no] == pytest.approx(evals.rewards(model, tokenizer, texts), abs=1e-4)

    v2 = reward.http.post("/v2/models/reward/infer", json={
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]})
    assert v2.status_code == 200, v2.text
    output = v2.json()["outputs"][0]
    assert output["name"] == "score" and output["datatype"] == "FP32"
    assert output["data"] == pytest.approx([yes, no], abs=1e-4)


def test_image_classifier_labels_a_digit(servers: dict[str, Server], data: dict[str, Path]) -> None:
    digits = servers["digits"]
    rows = [json.loads(line) for line in data["digits/validation.jsonl"].read_text().splitlines()]
    right = 0
    for row in rows[:: len(rows) // 10][:10]:
        image = base64.b64encode((data["digits/validation.jsonl"].parent / row["image"]).read_bytes()).decode()
        reply = digits.http.post("/v1/models/digits:predict", json={"instances": [{"image": {"b64": image}}]})
        assert reply.status_code == 200, reply.text
        labels = reply.json()["predictions"][0]
        assert len(labels) == 5 and {entry["label"] for entry in labels} <= {str(d) for d in range(10)}
        scores = [entry["score"] for entry in labels]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        right += labels[0]["label"] == str(row["label"])
    assert right >= 7, right  # ten held-out digits, mostly labelled right

    v2 = digits.http.post("/v2/models/digits/infer", json={
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]})
    assert v2.status_code == 200, v2.text
    assert {o["name"] for o in v2.json()["outputs"]} == {"label", "score"}


def test_bad_bodies_get_a_4xx_with_a_message_and_the_server_keeps_serving(servers: dict[str, Server]) -> None:
    lm, digits = servers["lm"], servers["digits"]
    bad = [
        (lm, "/openai/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        (lm, "/openai/v1/chat/completions", json.dumps({"model": "yes"}).encode(), 400, "messages"),
        (lm, "/openai/v1/chat/completions", json.dumps({"model": "nobody", "messages": [
            {"role": "user", "content": "hi"}]}).encode(), 404, "nobody"),
        (lm, "/openai/v1/completions", json.dumps({"model": "yes", "prompt": "x", "max_tokens": -1}).encode(), 400,
         "max_tokens"),
        (digits, "/v1/models/digits:predict", json.dumps({"instances": ["aGVsbG8="]}).encode(), 400,
         "cannot be decoded"),
        (digits, "/v1/models/digits:predict", json.dumps({"instances": "one"}).encode(), 400, "instances"),
    ]
    for server, path, body, status, words in bad:
        reply = server.http.post(path, content=body, headers={"content-type": "application/json"})
        assert reply.status_code == status, (path, body, reply.text)
        assert words in reply.text, reply.text
    assert chat(lm, "no", PROMPT).json()["choices"][0]["message"]["content"].strip() == "no"
    assert digits.http.get("/v2/health/live").status_code == 200

    metrics = lm.http.get("/metrics").text
    assert 'kubetune_serve_request_errors_total{code="400",route="/openai/v1/chat/completions"} 2.0' in metrics
    assert 'kubetune_serve_request_errors_total{code="404",route="/openai/v1/chat/completions"} 1.0' in metrics
    assert "kubetune_serve_request_duration_seconds_bucket" in metrics
    assert 'kubetune_serve_generated_tokens_total{model="no"}' in metrics


def test_readiness_and_liveness_as_kserve_expects(servers: dict[str, Server]) -> None:
    lm = servers["lm"]
    assert lm.http.get("/v2/health/live").json() == {"live": True}
    assert lm.http.get("/v2/health/ready").json() == {"ready": True}
    assert lm.http.get("/v1/models/no").json() == {"name": "no", "ready": True}
    assert lm.http.get("/v2/models/maybe/ready").status_code == 200
    assert lm.http.get("/v1/models/nobody").status_code == 404
