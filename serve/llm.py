"""The OpenAI-compatible LLM app: `/v1/completions`, `/v1/chat/completions`, `/v1/models`.

Two deployments. `LLMEngine` (one replica: `actors.llm.LLMEngineActor`) holds the engine, so
every request is batched into the same continuous step loop; `OpenAIServer` (the FastAPI
ingress, autoscaled) validates requests, renders OpenAI responses and server-sent events, and
streams from the engine through a deployment handle. Beyond OpenAI's fields, a request may set
`speculation` ("off", a fixed k, or "smartspec") and `top_k`; responses add `speculation`
(drafts proposed and accepted, verification steps).

Backpressure: the ingress's `max_ongoing_requests` / `max_queued_requests` (serve/config.yaml)
make Serve answer 503 with `Retry-After` beyond capacity; an engine that is down or restarting
gets the same answer, and a stream it breaks ends with an error event instead of `[DONE]`.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from actors.llm import LLMEngineActor
from kiln.config import Section
from serve.common import error_response, protect, resolve

RETRY_AFTER_S = "2"  # a restarting engine replica is back within seconds (tiny models)
MAX_SPECULATION_K = 8  # SmartSpec's K_max: a fixed k above it would be capped silently


class LLMAppConfig(Section):
    """`args` of the LLM application in serve/config.yaml."""

    name: str = Field("kiln-tiny", description="Model id clients pass as `model`.")
    model: str = Field(description="Checkpoint folder; relative paths start at the repository.")
    draft_model: str | None = Field(None, description="Draft checkpoint (proposer 'draft').")
    proposer: Literal["none", "draft", "ngram"] = Field(
        "ngram", description="Where drafts come from; 'none' serves without speculation."
    )
    speculation: Literal["smartspec"] | int = Field(
        "smartspec", description="Default for requests that do not choose: SmartSpec or fixed k."
    )
    max_num_seqs: int = Field(64, ge=1, description="Requests the engine batches at once.")
    max_model_len: int | None = Field(
        None, ge=2, description="Longest prompt + output served (default: the model's context)."
    )
    torch_threads: int | None = Field(None, ge=1, description="Engine intra-op threads cap.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger bodies get 413.")


LLMEngine = serve.deployment(LLMEngineActor, name="LLMEngine")


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by completions and chat (unknown fields are ignored, as OpenAI does)."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: str
    max_tokens: int = Field(16, ge=1, description="Prompt + max_tokens must fit the context.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off.")
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = (
        None
    )
    seed: int | None = Field(None, ge=0, lt=2**63)
    ignore_eos: bool = Field(False, description="Generate max_tokens even past EOS.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculation: (
        Literal["off", "smartspec"] | Annotated[int, Field(ge=1, le=MAX_SPECULATION_K)] | None
    ) = Field(None, description="Per request: 'off', a fixed k, or 'smartspec'.")

    def sampling_params(self) -> dict:
        params = self.model_dump(
            include={"max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos"}
        )
        params["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.speculation is not None:
            params["speculation"] = 0 if self.speculation == "off" else self.speculation
        return params


class CompletionRequest(GenerationRequest):
    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")

    def sampling_params(self) -> dict:
        params = super().sampling_params()
        params["max_tokens"] = self.max_completion_tokens or self.max_tokens
        return params


class Shape:
    """OpenAI's response and chunk layouts for one completion or chat request."""

    def __init__(self, chat: bool, request_id: str, model: str):
        self.chat, self.id, self.model, self.created = chat, request_id, model, int(time.time())

    def _envelope(self, kind: str, choices: list[dict], **extra) -> dict:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return {**head, "choices": choices, **extra}

    def _choice(self, text: str, finish_reason: str | None, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        key, message = "delta" if delta else "message", {"role": "assistant", "content": text}
        return {"index": 0, key: message, "finish_reason": finish_reason}

    def response(self, text: str, last: dict) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        choice = self._choice(text, _finish_reason(last), delta=False)
        return self._envelope(kind, [choice], usage=last["usage"], speculation=last["speculation"])

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        return self._envelope(self._chunk_kind, [self._choice(text, finish_reason, delta=True)])

    def usage_chunk(self, last: dict) -> dict:
        """The extra last chunk of `stream_options.include_usage`: no choices, the usage."""
        return self._envelope(
            self._chunk_kind, [], usage=last["usage"], speculation=last["speculation"]
        )

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


async def _chain(first: dict, rest: DeploymentResponseGenerator) -> AsyncIterator[dict]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        rest.cancel()  # a client that went away aborts its request in the engine


async def _events(shape: Shape, items: AsyncIterator[dict], include_usage: bool):
    try:
        async for item in items:
            finish_reason = _finish_reason(item) if "finish_reason" in item else None
            if item["text"] or finish_reason:
                yield _sse(shape.chunk(item["text"], finish_reason))
    except RayError:
        message = "the engine failed mid-stream; the text so far is incomplete, retry the request"
        yield _sse({"error": {"message": message, "type": "service_unavailable", "code": 503}})
        return
    if include_usage:
        yield _sse(shape.usage_chunk(item))
    yield _sse("[DONE]")


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _finish_reason(item: dict) -> str:
    return "length" if item["finish_reason"] == "length" else "stop"


def _unavailable(message: str):
    return error_response(503, message, headers={"Retry-After": RETRY_AFTER_S})


# Last in the module: serve.ingress captures the module's globals as they are here.
app = FastAPI(title="kiln LLM (OpenAI-compatible)")


@serve.deployment(name="OpenAIServer")
@serve.ingress(app)
class OpenAIServer:
    def __init__(self, engine: DeploymentHandle, model_name: str, max_body_bytes: int):
        protect(app, max_body_bytes)
        self.engine = engine
        self.model_name = model_name

    @app.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self):
        try:
            info = await self.engine.info.remote()
        except RayError:
            return _unavailable("the engine is not ready")
        return {"status": "ready", "model": self.model_name, **info}

    @app.get("/v1/models")
    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "kiln"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        return await self._generate(body, body.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest):
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt = await self.engine.render_chat.remote(messages)
        except RayError:
            return _unavailable("the engine is unavailable; retry shortly")
        return await self._generate(body, prompt, chat=True)

    async def _generate(self, body: GenerationRequest, prompt: str | list[int], chat: bool):
        if body.model != self.model_name:
            message = f"model: {body.model!r} is not served here; use {self.model_name!r}"
            return error_response(404, message, "model")
        shape = Shape(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", body.model)
        stream: DeploymentResponseGenerator = self.engine.generate.options(stream=True).remote(
            shape.id, prompt, body.sampling_params()
        )
        try:
            first = await stream.__anext__()
        except (BackPressureError, RayError):
            return _unavailable("the engine is at capacity or restarting; retry shortly")
        if "error" in first:
            return error_response(400, first["error"])
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                _events(shape, _chain(first, stream), usage), media_type="text/event-stream"
            )
        text = ""
        try:
            async for item in _chain(first, stream):
                text += item["text"]
        except RayError:
            return _unavailable("the engine failed during the request; retry it")
        return shape.response(text, item)


def build_app(args: dict) -> serve.Application:
    """The application `serve/config.yaml` names (`import_path: serve.llm:build_app`)."""
    config = LLMAppConfig.model_validate(args)
    engine = LLMEngine.bind(
        str(resolve(config.model)),
        torch_threads=config.torch_threads,
        draft_model=config.draft_model and str(resolve(config.draft_model)),
        proposer=config.proposer,
        speculation=config.speculation,
        max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len,
    )
    return OpenAIServer.bind(engine, config.name, config.max_body_bytes)
