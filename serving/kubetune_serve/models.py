"""The kserve.Model of each head: what a request to `/v1/models/<name>:predict` (v1) or
`/v2/models/<name>/infer` (v2) gets.

    causalLM             v1 {"instances": ["prompt", ...]}          -> {"predictions": ["completion", ...]}
                         v2 input "text" (BYTES)                     -> output "text" (BYTES)
                         (chat and completions: openai.py)
    reward               v1 {"instances": ["text" | {"prompt", "completion"} | {"messages"}, ...]}
                                                                     -> {"predictions": [score, ...]}
                         v2 input "text" (BYTES)                     -> output "score" (FP32)
    imageClassification  v1 {"instances": [{"image": {"b64": ...}} | {"b64": ...} | "<base64>", ...]}
                                                                     -> {"predictions": [[{"label", "score"}, ...], ...]}
                         v2 input "image" (BYTES, encoded image)     -> outputs "label" (BYTES), "score" (FP32)

A request KServe cannot read, or whose instances are not what the model takes, gets
`kserve.errors.InvalidInput`, which KServe answers with 400 and the message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import uuid
from typing import Any

import kserve
import numpy as np
import torch
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from kubetune_serve.loading import Served

TOP_LABELS = 5  # labels returned per image (fewer when the model has fewer)


def instances(payload: Any, input_name: str) -> tuple[list[Any], bool]:
    """(the request's instances, whether it came as v2): v1 `instances` (or `inputs`), or the v2 input
    named `input_name` (else the only one)."""
    if isinstance(payload, InferRequest):
        inputs = [i for i in payload.inputs if i.name == input_name] or payload.inputs[:1]
        if not inputs:
            raise InvalidInput(f"the request has no input; send one named {input_name!r}")
        values = inputs[0].as_numpy().reshape(-1).tolist()
        return values, True
    if not isinstance(payload, dict):
        raise InvalidInput('the request body must be a JSON object with "instances" (v1) or "inputs" (v2)')
    items = payload.get("instances", payload.get("inputs"))
    if not isinstance(items, list) or not items:
        raise InvalidInput('"instances" must be a non-empty list')
    return items, False


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    raise InvalidInput(f"expected a text, got {type(value).__name__}")


def v2_response(payload: InferRequest, model: str, outputs: dict[str, tuple[str, list[Any]]]) -> InferResponse:
    return InferResponse(
        response_id=payload.id or str(uuid.uuid4()), model_name=model,
        infer_outputs=[InferOutput(name=n, shape=[len(v)], datatype=t, data=v) for n, (t, v) in outputs.items()],
    )


class LanguageModel(kserve.Model):  # type: ignore[misc]  # kserve is untyped
    """A causal LM (a whole model or an adapter on its base) under one served name."""

    def __init__(self, served: Served) -> None:
        super().__init__(served.name)
        self.served = served
        self.ready = True

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        from kubetune_serve.openai import DEFAULT_COMPLETION_TOKENS, OpenAIError, generate

        items, v2 = instances(payload, "text")
        texts = []
        for item in items:
            prompt = _text(item.get("prompt") if isinstance(item, dict) else item)
            try:
                result = await asyncio.to_thread(generate, self.served, prompt, DEFAULT_COMPLETION_TOKENS, 0.0, 1.0,
                                                 1, [], None)
            except OpenAIError as e:
                raise InvalidInput(e.message) from None
            texts.append(result[0][0])
        if v2:
            return v2_response(payload, self.name, {"text": ("BYTES", texts)})
        return {"predictions": texts}


class RewardModel(kserve.Model):  # type: ignore[misc]
    """A reward model: one scalar score per text (higher is preferred)."""

    def __init__(self, served: Served) -> None:
        super().__init__(served.name)
        self.served = served
        self.ready = True

    def texts(self, items: list[Any]) -> list[str]:
        """What the reward model scores, as the reward stage trained it: prompt + completion + eos."""
        from kubetune_trainer import evals

        tokenizer = self.served.processing_class
        out = []
        for item in items:
            if isinstance(item, dict) and "messages" in item:
                out.append(str(tokenizer.apply_chat_template(item["messages"], tokenize=False)))
            elif isinstance(item, dict) and "prompt" in item and "completion" in item:
                out.append(evals.prompt_text(tokenizer, item["prompt"]) + evals.completion_text(item["completion"])
                           + (tokenizer.eos_token or ""))
            elif isinstance(item, dict) and "text" in item:
                out.append(_text(item["text"]))
            elif isinstance(item, (str, bytes)):
                out.append(_text(item))
            else:
                raise InvalidInput('each instance is a text, {"text"}, {"prompt", "completion"} or {"messages"}')
        return out

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        from kubetune_trainer import evals

        items, v2 = instances(payload, "text")
        texts = self.texts(items)

        def score() -> list[float]:
            with self.served.lock:
                self.served.activate()
                return evals.rewards(self.served.model, self.served.processing_class, texts)

        scores = await asyncio.to_thread(score)
        if v2:
            return v2_response(payload, self.name, {"score": ("FP32", scores)})
        return {"predictions": scores}


def decode_image(item: Any) -> Any:
    """A PIL image (RGB) from an instance: base64 text, {"b64": ...}, {"image": ...} or {"image_bytes": ...}."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, dict):
        for key in ("image", "image_bytes", "b64", "data"):
            if key in item:
                return decode_image(item[key])
        raise InvalidInput('an image instance is base64 text, or {"image": {"b64": ...}}')
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("the image is not valid base64") from None
    if not isinstance(item, bytes):
        raise InvalidInput(f"expected an encoded image, got {type(item).__name__}")
    try:
        with Image.open(io.BytesIO(item)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidInput(f"the image cannot be decoded: {e}") from None


class ImageClassifier(kserve.Model):  # type: ignore[misc]
    """An image classifier: its labels with scores (softmax), best first."""

    def __init__(self, served: Served) -> None:
        super().__init__(served.name)
        self.served = served
        self.ready = True

    def classify(self, images: list[Any]) -> list[list[dict[str, Any]]]:
        model, processor = self.served.model, self.served.processing_class
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with self.served.lock, torch.no_grad():
            self.served.activate()
            weight = next(model.parameters())
            logits = model(pixel_values=pixels.to(weight.device, weight.dtype)).logits.float()
        probs = logits.softmax(-1)
        k = min(TOP_LABELS, probs.shape[-1])
        top = probs.topk(k, dim=-1)
        id2label = model.config.id2label
        return [[{"label": str(id2label.get(int(i), i)), "score": float(s)} for s, i in zip(scores, ids, strict=True)]
                for scores, ids in zip(top.values, top.indices, strict=True)]

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        items, v2 = instances(payload, "image")
        images = [decode_image(i) for i in items]
        results = await asyncio.to_thread(self.classify, images)
        if v2:
            best = [r[0] for r in results]
            return v2_response(payload, self.name, {"label": ("BYTES", [b["label"] for b in best]),
                                                    "score": ("FP32", np.array([b["score"] for b in best]).tolist())})
        return {"predictions": results}


# head -> the kserve.Model that serves it
MODELS: dict[str, type[LanguageModel] | type[RewardModel] | type[ImageClassifier]] = {
    "causalLM": LanguageModel,
    "reward": RewardModel,
    "imageClassification": ImageClassifier,
}
