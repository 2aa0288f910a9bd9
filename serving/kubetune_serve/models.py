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
    contrastiveImageText v1 {"instances": ["text" | {"text"} | {"image": {"b64": ...}, "labels"?: [...]}, ...],
                             "labels"?: [...], "promptTemplate"?: "a photo of a {label}"}
                                                                     -> {"predictions": [{"embedding": [...],
                                                                         "labels"?: [{"label", "score"}, ...]}, ...]}
                         v2 inputs "text", "image", "labels" (BYTES) -> outputs "text_embedding", "image_embedding"
                                                                        (FP32 [n, dim]), "label", "score", "scores"
    diffusionUNet        v1 {"instances": ["prompt" | {"prompt", "seed", "steps", "guidanceScale"}, ...]}
                                                                     -> {"predictions": [{"image": {"b64": PNG}}, ...]}
                         v2 input "text" (BYTES)                     -> output "image" (BYTES, base64 PNG)
    ctc, speechSeq2Seq   v1 {"instances": [{"audio": {"b64": ...}} | {"b64": ...} | "<base64>", ...]}
                         (wav2vec 2.0 CTC, Whisper; any audio file soundfile reads, any sample rate)
                                                                     -> {"predictions": [{"text": ...}, ...]}
                         v2 input "audio" (BYTES, encoded audio)     -> output "text" (BYTES)

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


# --- CLIP: embeddings and zero-shot labels ---------------------------------------------------


def clip_prompt_template(served: Served) -> str:
    """The prompt each candidate label is put into: the clip stage's clip.promptTemplate, as its metrics.json
    records it (beside the model, or one folder up from merged/), else the recipe's default."""
    from kubetune.api.registry import ClipSpec

    from kubetune_serve.loading import _read_json

    path = served.stage.path
    for folder in (path, path.parent) if path.name == "merged" else (path,):
        zero_shot = _read_json(folder / "metrics.json").get("zeroShot")
        if isinstance(zero_shot, dict) and isinstance(zero_shot.get("promptTemplate"), str):
            return str(zero_shot["promptTemplate"])
    return str(ClipSpec.model_fields["prompt_template"].default)


def _candidate_labels(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, bytes)) for v in value):
        raise InvalidInput('"labels" must be a non-empty list of texts: the candidate labels of the images')
    return [_text(v) for v in value]


def _prompt_template(value: Any, default: str) -> str:
    value = getattr(value, "string_param", value)  # a gRPC InferParameter
    if value is None:
        return default
    if not isinstance(value, str) or "{label}" not in value:
        raise InvalidInput('"promptTemplate" must be a text with {label} in it, e.g. "a photo of a {label}"')
    return value


class ImageText(kserve.Model):  # type: ignore[misc]
    """A CLIP model (a clip stage's CLIPModel with its CLIPProcessor): unit-length embeddings of texts and of
    images, and an image's zero-shot labels among candidate labels: each label put into the prompt template
    (the stage's clip.promptTemplate, or the request's `promptTemplate`) and scored as CLIP does, the softmax
    of the temperature-scaled cosine similarities, best first (the trainer's zeroShotAccuracy picks the same
    best label).

        v1 {"instances": ["text" | {"text"} | {"image": {"b64"}, "labels"?}, ...], "labels"?, "promptTemplate"?}
           -> {"predictions": [{"embedding"} | {"embedding", "labels": [{"label", "score"}, ...]}, ...]}
        v2 inputs "text" (BYTES), "image" (BYTES), "labels" (BYTES; parameter "promptTemplate")
           -> outputs "text_embedding", "image_embedding" (FP32 [n, dim]); with labels "label" (BYTES),
              "score" (FP32) and "scores" (FP32 [images, labels])
    """

    def __init__(self, served: Served) -> None:
        super().__init__(served.name)
        self.served = served
        self.template = clip_prompt_template(served)
        self.ready = True

    def run(self, texts: list[str], images: list[Any],
            zero_shot: list[tuple[list[str], str] | None]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """(text embeddings, image embeddings, per image: its candidate labels' probabilities or None)."""
        model, processor = self.served.model, self.served.processing_class

        def embed_texts(texts: list[str]) -> torch.Tensor:  # as recipes/clip.py's, without the trainer's imports
            enc = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                      max_length=int(model.config.text_config.max_position_embeddings))
            enc = enc.to(next(model.parameters()).device)
            features = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            return torch.nn.functional.normalize(features.pooler_output.float(), dim=-1)

        with self.served.lock, torch.no_grad():
            self.served.activate()
            text = embed_texts(texts) if texts else torch.empty(0)
            image = torch.empty(0)
            if images:
                weight = next(model.parameters())
                pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(weight.device, weight.dtype)
                features = model.get_image_features(pixel_values=pixels).pooler_output.float()
                image = torch.nn.functional.normalize(features, dim=-1)
            scale = float(model.logit_scale.exp())
            prompts: dict[tuple[tuple[str, ...], str], torch.Tensor] = {}
            probabilities: list[torch.Tensor | None] = []
            for i, candidates in enumerate(zero_shot):
                if candidates is None:
                    probabilities.append(None)
                    continue
                labels, template = candidates
                key = (tuple(labels), template)
                if key not in prompts:
                    prompts[key] = embed_texts([template.replace("{label}", x) for x in labels])
                probabilities.append((scale * image[i] @ prompts[key].T).softmax(-1))
        return text.cpu(), image.cpu(), [p if p is None else p.cpu() for p in probabilities]

    def v1(self, payload: dict[str, Any]) -> tuple[list[tuple[str, Any]], list[tuple[list[str], str] | None]]:
        """The instances as ("text", str) or ("image", PIL image), and each image's (labels, template) or None."""
        items, _ = instances(payload, "text")
        labels = _candidate_labels(payload.get("labels"))
        template = _prompt_template(payload.get("promptTemplate"), self.template)
        parsed: list[tuple[str, Any]] = []
        zero_shot: list[tuple[list[str], str] | None] = []
        for item in items:
            if isinstance(item, (str, bytes)) or (isinstance(item, dict) and "text" in item and "image" not in item):
                parsed.append(("text", _text(item["text"] if isinstance(item, dict) else item)))
            elif isinstance(item, dict) and "text" not in item and any(k in item for k in ("image", "image_bytes", "b64")):
                parsed.append(("image", decode_image(item)))
                mine = _candidate_labels(item.get("labels")) or labels
                zero_shot.append(None if mine is None else (mine, template))
            else:
                raise InvalidInput('each instance is a text ("..." or {"text": "..."}) or an image ({"image": {"b64": '
                                   '"..."}, "labels": [...]}), not both')
        return parsed, zero_shot

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        if isinstance(payload, InferRequest):
            return await self.predict_v2(payload)
        if not isinstance(payload, dict):
            raise InvalidInput('the request body must be a JSON object with "instances" (v1) or "inputs" (v2)')
        parsed, zero_shot = self.v1(payload)
        texts = [v for kind, v in parsed if kind == "text"]
        images = [v for kind, v in parsed if kind == "image"]
        text, image, probabilities = await asyncio.to_thread(self.run, texts, images, zero_shot)
        out, t, i = [], 0, 0
        for kind, _ in parsed:
            if kind == "text":
                out.append({"embedding": text[t].tolist()})
                t += 1
                continue
            prediction: dict[str, Any] = {"embedding": image[i].tolist()}
            probs, candidates = probabilities[i], zero_shot[i]
            if probs is not None and candidates is not None:
                order = probs.argsort(descending=True).tolist()
                prediction["labels"] = [{"label": candidates[0][j], "score": float(probs[j])} for j in order]
            out.append(prediction)
            i += 1
        return {"predictions": out}

    async def predict_v2(self, payload: InferRequest) -> InferResponse:
        by_name = {i.name: i for i in payload.inputs}
        unknown = set(by_name) - {"text", "image", "labels"}
        if unknown or not ({"text", "image"} & set(by_name)):
            raise InvalidInput(f"send the inputs text and/or image (BYTES), and labels with an image; got "
                               f"{', '.join(sorted(by_name)) or 'none'}")
        if "labels" in by_name and "image" not in by_name:
            raise InvalidInput("labels are the candidate labels of images: send an image input with them")

        def values(name: str) -> list[Any]:
            return by_name[name].as_numpy().reshape(-1).tolist() if name in by_name else []

        texts = [_text(v) for v in values("text")]
        images = [decode_image(v) for v in values("image")]
        labels = _candidate_labels(values("labels") or None)
        params = payload.parameters or {}
        template = _prompt_template(params.get("promptTemplate") if hasattr(params, "get") else None, self.template)
        zero_shot = [None if labels is None else (labels, template) for _ in images]
        text, image, probabilities = await asyncio.to_thread(self.run, texts, images, zero_shot)
        outputs = []
        for name, embeddings in (("text_embedding", text), ("image_embedding", image)):
            if len(embeddings):
                outputs.append(InferOutput(name=name, shape=list(embeddings.shape), datatype="FP32",
                                           data=embeddings.reshape(-1).tolist()))
        if labels is not None and images:
            scores = torch.stack([p for p in probabilities if p is not None])
            best = scores.argmax(-1).tolist()
            outputs += [InferOutput(name="label", shape=[len(best)], datatype="BYTES", data=[labels[j] for j in best]),
                        InferOutput(name="score", shape=[len(best)], datatype="FP32",
                                    data=scores.max(-1).values.tolist()),
                        InferOutput(name="scores", shape=list(scores.shape), datatype="FP32",
                                    data=scores.reshape(-1).tolist())]
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=outputs)


DEFAULT_STEPS = 25  # denoising steps of a request that names none (DDIM on the pipeline's schedule)
MAX_STEPS = 200
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance of a request that names none (diffusers' pipelines' default)
MAX_IMAGES = 8  # instances per request


class TextToImage(kserve.Model):  # type: ignore[misc]
    """A diffusers pipeline a diffusion stage wrote: a PNG for each prompt (DDIM, classifier-free guidance)."""

    def __init__(self, served: Served) -> None:
        super().__init__(served.name)
        self.served = served
        self.ready = True

    def request(self, item: Any) -> dict[str, Any]:
        """A prompt with its options: a text, or {"prompt", "seed", "steps", "guidanceScale"}."""
        options = item if isinstance(item, dict) else {"prompt": item}
        prompt = _text(options.get("prompt"))
        try:
            seed, steps = int(options.get("seed", 0)), int(options.get("steps", DEFAULT_STEPS))
            guidance = float(options.get("guidanceScale", DEFAULT_GUIDANCE))
        except (TypeError, ValueError):
            raise InvalidInput("seed and steps are integers, guidanceScale a number") from None
        if not 1 <= steps <= MAX_STEPS:
            raise InvalidInput(f"steps must be between 1 and {MAX_STEPS}")
        return {"prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance}

    def draw(self, requests: list[dict[str, Any]]) -> list[str]:
        """Base64 PNGs, one per request, each from its own seed."""
        from kubetune_trainer.recipes.diffusion import generate

        out = []
        with self.served.lock:
            for r in requests:
                image = generate(self.served.model, [r["prompt"]], 1, r["steps"], r["guidance"], seed=r["seed"])[0][0]
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return out

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        items, v2 = instances(payload, "text")
        if len(items) > MAX_IMAGES:
            raise InvalidInput(f"at most {MAX_IMAGES} prompts per request")
        pngs = await asyncio.to_thread(self.draw, [self.request(i) for i in items])
        if v2:
            return v2_response(payload, self.name, {"image": ("BYTES", pngs)})
        return {"predictions": [{"image": {"b64": p}} for p in pngs]}


# head -> the kserve.Model that serves it
# --- speech recognition ------------------------------------------------------------------------


def decode_audio(item: Any) -> Any:
    """16 kHz mono samples from an instance: base64 text, {"b64": ...} or {"audio": ...} of any audio file
    soundfile reads (WAV, FLAC, OGG, MP3), resampled with torchaudio as the trainer reads clips."""
    from kubetune_trainer.data import audio

    if isinstance(item, dict):
        for key in ("audio", "audio_bytes", "b64", "data"):
            if key in item:
                return decode_audio(item[key])
        raise InvalidInput('an audio instance is base64 text, or {"audio": {"b64": ...}}')
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("the audio is not valid base64") from None
    if not isinstance(item, bytes):
        raise InvalidInput(f"expected an encoded audio file, got {type(item).__name__}")
    try:
        return audio.load_audio({"bytes": item})
    except Exception as e:  # soundfile's LibsndfileError and friends
        raise InvalidInput(f"the audio cannot be decoded: {e}") from None


class SpeechRecognizer(kserve.Model):  # type: ignore[misc]
    """A speech recogniser (wav2vec 2.0 CTC or Whisper) through transformers' ASR pipeline: greedy transcripts,
    Whisper writing the language and task tokens its stage trained with (its generation config's defaults)."""

    def __init__(self, served: Served) -> None:
        super().__init__(served.name)
        self.served = served
        self.ready = True

    def transcribe(self, clips: list[Any]) -> list[str]:
        with self.served.lock, torch.no_grad():
            said = self.served.model(clips, batch_size=len(clips))
        return [str(s["text"]).strip() for s in said]

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        items, v2 = instances(payload, "audio")
        clips = [decode_audio(i) for i in items]
        texts = await asyncio.to_thread(self.transcribe, clips)
        if v2:
            return v2_response(payload, self.name, {"text": ("BYTES", texts)})
        return {"predictions": [{"text": t} for t in texts]}


MODELS: dict[str, type[LanguageModel] | type[RewardModel] | type[ImageClassifier] | type[TextToImage]
             | type[ImageText] | type[SpeechRecognizer]] = {
    "causalLM": LanguageModel,
    "reward": RewardModel,
    "imageClassification": ImageClassifier,
    "contrastiveImageText": ImageText,
    "diffusionUNet": TextToImage,
    "ctc": SpeechRecognizer,
    "speechSeq2Seq": SpeechRecognizer,
}
