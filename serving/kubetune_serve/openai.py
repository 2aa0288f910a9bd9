"""OpenAI-compatible routes of kubetune-serve: `/openai/v1/models`, `/openai/v1/chat/completions`,
`/openai/v1/completions`, where KServe puts them (its `KSERVE_OPENAI_ROUTE_PREFIX`, default `/openai`).

    curl -s localhost:8080/openai/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"model": "sft", "messages": [{"role": "user", "content": "b i q p last letter:"}]}'

The model is picked by the request's `"model"`, as vLLM does: the stage's name, or an adapter's.

Why these routes are kubetune's and not `kserve.protocol.rest.openai`'s: in kserve 0.21 that layer's
request and response types and its endpoints are vLLM's (`kserve/protocol/rest/openai/types`
imports `vllm.entrypoints.openai...`, `endpoints.py` imports vLLM's `with_cancellation`), and
vLLM pins its own torch and transformers, which cannot live beside the trainer's (torch 2.11,
transformers 5); KServe's ModelServer itself registers that layer only `try`-ing the import and
logs "OpenAI endpoints not registered" without vLLM. So the routes here are KServe's paths and
the OpenAI wire format (the subset a transformers `generate` can honour: `max_tokens` /
`max_completion_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed`; no streaming), added to
KServe's own FastAPI app beside its v1/v2 routes, with KServe's OpenAI error shape
(`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any, Literal

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetune_serve.loading import Served

PREFIX = os.environ.get("KSERVE_OPENAI_ROUTE_PREFIX", "/openai")
if PREFIX and not PREFIX.startswith("/"):
    PREFIX = "/" + PREFIX
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions
DEFAULT_CHAT_TOKENS = 256


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields kubetune-serve does not act on are accepted

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str = "", kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.kind = message, status, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": str(self.status)}})


# --- generation ---------------------------------------------------------------------------


def generate(served: Served, prompt: str, max_new_tokens: int, temperature: float, top_p: float, n: int,
             stop: list[str], seed: int | None) -> list[tuple[str, str, int, int]]:
    """n completions of `prompt`: (text, finish reason, prompt tokens, completion tokens) each."""
    from kubetune_trainer import models

    tokenizer = served.processing_class
    templated = models.IM_START in prompt or (tokenizer.bos_token is not None and prompt.startswith(tokenizer.bos_token))
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=not templated)
    ids = enc["input_ids"].to(next(served.model.parameters()).device)
    limit = getattr(served.model.config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] >= limit:
        raise OpenAIError(f"the prompt has {ids.shape[1]} tokens; this model reads at most {limit}", param="messages")
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - ids.shape[1])
    eos = models.end_of_turn_ids(tokenizer)
    sample = temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample, "num_return_sequences": n}
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    elif n > 1:
        raise OpenAIError("n > 1 needs temperature > 0 (greedy answers are all the same)", param="n")
    with served.lock, torch.no_grad():
        served.activate()
        if seed is not None:
            torch.manual_seed(seed)
        out = served.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **kwargs,
        )
    results = []
    for seq in out[:, ids.shape[1]:]:
        tokens = seq.tolist()
        ended = next((i for i, t in enumerate(tokens) if t in eos), None)
        if ended is not None:
            tokens = tokens[:ended]
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        reason = "stop" if ended is not None else "length"
        for s in stop:
            if s and s in text:
                text, reason = text[:text.index(s)], "stop"
        results.append((text, reason, int(ids.shape[1]), len(tokens) + (ended is not None)))
    return results


# --- routes -------------------------------------------------------------------------------


def _parse(model: type[_Sampling], body: Any) -> Any:
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise OpenAIError(f"{where}: {first['msg']}", param=where) from None
    if request.stream:
        raise OpenAIError("stream is not supported by kubetune-serve; send stream: false", param="stream")
    return request


async def _body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise OpenAIError("the request body is not valid JSON") from None


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def register(app: FastAPI, models: dict[str, Served], metrics: Any = None) -> None:
    """Add the OpenAI-compatible routes for the causal LMs `models` (by served name) to KServe's app."""
    started = int(time.time())
    router = APIRouter(prefix=PREFIX, tags=["OpenAI"])

    def pick(name: str) -> Served:
        if name not in models:
            raise OpenAIError(f"model {name!r} is not served here; the models are {', '.join(sorted(models))}",
                              status=404, param="model", kind="NotFoundError")
        return models[name]

    def card(name: str) -> dict[str, Any]:
        s = models[name]
        return {"id": name, "object": "model", "created": started, "owned_by": "kubetune",
                "root": str(s.stage.path), "parent": str(s.stage.base) if s.stage.base else None}

    async def run(served: Served, prompt: str, req: _Sampling, max_tokens: int) -> list[tuple[str, str, int, int]]:
        results = await asyncio.to_thread(generate, served, prompt, max_tokens, req.temperature, req.top_p,
                                          req.n, _stops(req.stop), req.seed)
        if metrics is not None:
            metrics.generated(served.name, sum(r[3] for r in results))
        return results

    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card(n) for n in sorted(models)]}

    async def get_model(model_name: str) -> Any:
        try:
            return card(pick(model_name).name)
        except OpenAIError as e:
            return e.response()

    async def chat(request: Request) -> Any:
        from kubetune_trainer import evals

        try:
            req = _parse(ChatCompletionRequest, await _body(request))
            served = pick(req.model)
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            try:
                prompt = evals.prompt_text(served.processing_class, messages)
            except Exception as e:  # jinja's own errors: a template that refuses these messages
                raise OpenAIError(f"the chat template refused the messages: {e}", param="messages") from None
            results = await run(served, prompt, req, req.max_completion_tokens or req.max_tokens or DEFAULT_CHAT_TOKENS)
        except OpenAIError as e:
            return e.response()
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": req.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                        for i, (text, reason, _, _) in enumerate(results)],
            "usage": _usage(results),
        }

    async def complete(request: Request) -> Any:
        try:
            req = _parse(CompletionRequest, await _body(request))
            served = pick(req.model)
            prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if not prompts:
                raise OpenAIError("prompt is empty", param="prompt")
            results = []
            for p in prompts:
                results += await run(served, p, req, req.max_tokens or DEFAULT_COMPLETION_TOKENS)
        except OpenAIError as e:
            return e.response()
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": req.model,
            "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                        for i, (text, reason, _, _) in enumerate(results)],
            "usage": _usage(results),
        }

    router.add_api_route("/v1/models", list_models, methods=["GET"])
    router.add_api_route("/v1/models/{model_name}", get_model, methods=["GET"])
    router.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    router.add_api_route("/v1/completions", complete, methods=["POST"])
    app.include_router(router)


def _usage(results: list[tuple[str, str, int, int]]) -> dict[str, int]:
    prompt = results[0][2] if results else 0  # the prompt of the first choice (completions of several prompts: each has one)
    completion = sum(r[3] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
