"""The HTTP layer: OpenAI's routes on FastAPI, over the engine and the adapter registry.

Every request body is read here with a size limit (413), parsed as JSON (400) and validated by the
pydantic models of :mod:`.protocol` (400 naming the field); then prompt length, ``max_tokens``, ``n``
and the queue are checked (400/429) before any work starts. With an API key, every route but
``/health`` needs ``Authorization: Bearer KEY`` (401), compared in constant time. Errors are OpenAI's
JSON error bodies; anything unexpected is a 500 with a JSON body and the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterRegistry
from .engine import Engine, Event, Job
from .errors import ApiError, error_body
from .protocol import (
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    chunk,
    completion_response,
    model_list,
    new_id,
    usage,
    usage_chunk,
)
from .sampling import SamplingParams

log = logging.getLogger("deltatune.serve")


@dataclass
class Limits:
    """What one request may ask for; beyond these it gets a 400/413/429 before any work starts."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    max_n: int = 8
    context_length: int = 2048  # prompt + new tokens, at most the model's positions


class AddAdapter(BaseModel):
    name: str
    path: str


class VllmLoadLora(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body (``lora_path`` here: relative to ``--adapters-dir``)."""

    lora_name: str
    lora_path: str


class VllmUnloadLora(BaseModel):
    lora_name: str


@dataclass
class Server:
    """What the routes work with."""

    engine: Engine
    registry: AdapterRegistry
    tokenizer: Any
    limits: Limits
    api_key: str | None = None


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 past ``limit`` bytes (before reading it all), 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"Request body of {declared} bytes is over the limit of {limit} bytes.")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"Request body is over the limit of {limit} bytes.")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The body is not valid JSON: {exc}.") from exc


def parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"Invalid request: {where}: {first['msg']}.", param=where) from exc


class Collector:
    """Receives a job's events from the engine thread on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    def emitter(self, prompt_index: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (prompt_index, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        return emit


def _check_sampling(req: SamplingFields, limits: Limits, max_tokens: int | None) -> SamplingParams:
    field = req.unsupported_field()
    if field:
        raise ApiError(400, f"{field!r} is not supported by this server; leave it out.", param=field)
    if req.n > limits.max_n:
        raise ApiError(400, f"n={req.n} is over this server's limit of {limits.max_n}.", param="n")
    budget = max_tokens or limits.max_tokens
    if budget > limits.max_tokens:
        raise ApiError(400, f"max_tokens={budget} is over this server's limit of {limits.max_tokens}.",
                       param="max_tokens")
    return SamplingParams(budget, req.temperature, req.top_p, list(req.stop or []), req.seed)


def _check_prompt(ids: list[int], params: SamplingParams, limits: Limits, in_front: int = 0) -> None:
    """``in_front``: positions the adapter puts before the prompt (virtual tokens, a prefix)."""
    if not ids:
        raise ApiError(400, "The prompt is empty (no tokens).", param="prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"The prompt has {len(ids)} tokens; this server takes at most {limits.max_prompt_tokens}.",
                       param="prompt")
    if in_front + len(ids) + params.max_tokens > limits.context_length:
        front = f"the adapter's {in_front} virtual positions + " if in_front else ""
        raise ApiError(400, f"{front}prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) is over the "
                       f"model's context of {limits.context_length} tokens; lower max_tokens.", param="max_tokens")


def chat_prompt_ids(tokenizer: Any, req: ChatRequest) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "This model's tokenizer has no chat template; use /v1/completions.")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes its own


def create_app(server: Server) -> FastAPI:
    """The FastAPI application; the engine starts and stops with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="deltatune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    if server.api_key:
        app.add_middleware(RequireApiKey, key=server.api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **server.engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return model_list(server.registry.model_names(), server.registry.base_name)

    @app.post("/v1/adapters")
    async def add_adapter(request: Request) -> dict[str, Any]:
        req = parse(AddAdapter, await read_json(request, server.limits.max_body_bytes))
        await asyncio.to_thread(server.registry.load_from_dir, req.name, req.path)
        return {"object": "adapter", "id": req.name, "loaded": True}

    @app.post("/v1/load_lora_adapter")  # vLLM's route for the same thing
    async def vllm_load(request: Request) -> dict[str, Any]:
        req = parse(VllmLoadLora, await read_json(request, server.limits.max_body_bytes))
        await asyncio.to_thread(server.registry.load_from_dir, req.lora_name, req.lora_path)
        return {"object": "adapter", "id": req.lora_name, "loaded": True}

    @app.post("/v1/unload_lora_adapter")  # vLLM's route; drains like DELETE /v1/adapters/{name}
    async def vllm_unload(request: Request) -> Any:
        req = parse(VllmUnloadLora, await read_json(request, server.limits.max_body_bytes))
        return await delete_adapter(req.lora_name)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str) -> Any:
        busy = await asyncio.to_thread(server.engine.unload, name)
        if busy:  # drained: no new requests; unloaded once these finish (see /health's draining_adapters)
            return JSONResponse({"object": "adapter", "id": name, "deleted": False, "draining": True,
                                 "requests_in_flight": busy}, status_code=202)
        return {"object": "adapter", "id": name, "deleted": True}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = parse(CompletionRequest, await read_json(request, server.limits.max_body_bytes))
        params = _check_sampling(req, server.limits, req.max_tokens)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        ids = [list(server.tokenizer(p)["input_ids"]) for p in prompts]
        return await generate(server, request, req, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = parse(ChatRequest, await read_json(request, server.limits.max_body_bytes))
        params = _check_sampling(req, server.limits, req.token_budget())
        return await generate(server, request, req, [chat_prompt_ids(server.tokenizer, req)], params, chat=True)

    return app


async def generate(server: Server, request: Request, req: SamplingFields, prompts: list[list[int]],
                   params: SamplingParams, chat: bool) -> Any:
    """Submit one job per prompt and answer with the whole result or an SSE stream."""
    adapter = server.registry.resolve(req.model)
    in_front = server.registry.leading_positions(adapter)
    for ids in prompts:
        _check_prompt(ids, params, server.limits, in_front)
    collector = Collector(asyncio.get_running_loop())
    jobs = [Job(adapter, ids, params, req.n, collector.emitter(i)) for i, ids in enumerate(prompts)]
    try:
        for job in jobs:
            server.engine.submit(job)
    except ApiError:
        for job in jobs:
            server.engine.cancel(job)
        raise
    rid = new_id("chatcmpl" if chat else "cmpl")
    prompt_tokens = sum(len(ids) for ids in prompts)  # the prompt's own tokens: virtual tokens do not count
    if req.stream:
        return StreamingResponse(stream(server, jobs, collector, rid, req.model, prompt_tokens, chat),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        return await collect(request, jobs, collector, rid, req.model, prompt_tokens, chat)
    finally:
        for job in jobs:
            server.engine.cancel(job)  # no-op for finished jobs; frees the slots of a client that left


async def collect(request: Request, jobs: list[Job], collector: Collector, rid: str, model: str,
                  prompt_tokens: int, chat: bool) -> dict[str, Any]:
    n = jobs[0].n
    texts = [""] * (len(jobs) * n)
    reasons: list[str] = [""] * len(texts)
    done, generated = 0, 0
    while done < len(texts):
        try:
            prompt, event = await asyncio.wait_for(collector.queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ApiError(499, "client disconnected") from None
            continue
        slot = prompt * n + event.choice
        if event.kind == "error":
            raise ApiError(500, f"Generation failed: {event.text}", code="generation_error")
        if event.kind == "text":
            texts[slot] += event.text
        else:
            reasons[slot], done, generated = event.reason or "stop", done + 1, generated + event.tokens
    return completion_response(rid, model, texts, reasons, usage(prompt_tokens, generated), chat)


async def stream(server: Server, jobs: list[Job], collector: Collector, rid: str, model: str,
                 prompt_tokens: int, chat: bool) -> AsyncIterator[str]:
    """Server-sent events: chunks as tokens come, a usage chunk, then ``data: [DONE]``."""
    n = jobs[0].n
    total, done, generated = len(jobs) * n, 0, 0
    started: set[int] = set()
    try:
        while done < total:
            prompt, event = await collector.queue.get()
            slot = prompt * n + event.choice
            if event.kind == "error":
                yield f"data: {json.dumps(error_body(500, f'Generation failed: {event.text}'))}\n\n"
                return
            first = chat and slot not in started
            started.add(slot)
            if event.kind == "text":
                yield f"data: {json.dumps(chunk(rid, model, slot, event.text, None, chat, role=first))}\n\n"
            else:
                done, generated = done + 1, generated + event.tokens
                text = "" if not chat or first else None
                yield f"data: {json.dumps(chunk(rid, model, slot, text, event.reason, chat, role=first))}\n\n"
        yield f"data: {json.dumps(usage_chunk(rid, model, usage(prompt_tokens, generated), chat))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            server.engine.cancel(job)  # a client that left frees its slots before the next step


class RequireApiKey:
    """ASGI middleware: every path but ``/health`` needs ``Authorization: Bearer KEY`` (constant-time compare)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                body = error_body(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                                  code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        return JSONResponse(error_body(500, f"Internal error: {type(exc).__name__}: {exc}"), status_code=500)
