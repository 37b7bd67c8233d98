"""An OpenAI-compatible HTTP API over runtime engines: routes, streaming, the CPU gate.

    from server import attach_api, create_api
    attach_api(demo, {"bitnet-b1.58-2B-4T": engine})   # beside a launched Gradio page (app.py)
    uvicorn.run(create_api({"bitnet-b1.58-2B-4T": engine}), port=8000)   # or alone

Requests are parsed by server/requests.py (pydantic models), models found by
server/models.py (ModelRegistry), errors shaped by server/errors.py.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions (stream or not),
GET /v1/health (open even with a key: queue state only). Every error is JSON in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status for what the client did
and 429/503 (with Retry-After) when the CPU is taken.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request

from .errors import ApiError, bad
from .limits import API_KEY_ENV, Limits
from .models import ModelRegistry
from .requests import ChatRequest, parse_chat_request
from .scheduler import Busy, Gate, Job, JobRecord

log = logging.getLogger("bitnet.api")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes):
    if not body.strip():
        raise bad("the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the request body is not UTF-8 text ({e.reason} at byte {e.start})", code="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise bad("the JSON is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None


# -- the app ---------------------------------------------------------------------------------
@dataclass
class ApiState:
    registry: ModelRegistry
    gate: Gate
    limits: Limits
    api_key: str | None
    jobs: dict = field(default_factory=dict)  # id -> Job, while running

    def records(self) -> list[JobRecord]:
        return list(self.gate.records)

    def engine_idle(self) -> bool:
        """No generation running or waiting, and no worker thread inside an engine."""
        return self.gate.idle() and not any(not j.finished.is_set() for j in list(self.jobs.values()))


async def _read_body(request, limits: Limits) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limits.max_body_bytes:
                raise ApiError(413, f"the request body is {int(declared)} bytes; the limit is "
                                    f"{limits.max_body_bytes}", code="body_too_large")
        except ValueError:
            raise bad("Content-Length is not a number", code="invalid_header") from None
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"the request body exceeds the limit of {limits.max_body_bytes} bytes",
                               code="body_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout_s} s",
                       code="body_timeout") from None
    return b"".join(chunks)


def create_api(models, *, limits: Limits | None = None, api_key: str | None = ...,
               gate: Gate | None = None, default_name: str | None = None, title: str = "bitnet-onnx"):
    """A FastAPI app serving `models` (see ModelRegistry) under /v1.

    api_key: None = open; a string = required as `Authorization: Bearer KEY`; left out = the
    BITNET_API_KEY environment variable (unset or empty: open).
    limits: Limits (default: Limits.from_env(), i.e. BITNET_API_* variables).
    gate: share one Gate with the Gradio page so both queue for the same CPU.
    The state (registry, gate, limits) is at `app.state.bitnet`.
    """
    from fastapi import FastAPI

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    install_api(app, models, limits=limits, api_key=api_key, gate=gate, default_name=default_name)
    return app


def install_api(app, models, *, limits: Limits | None = None, api_key: str | None = ...,
                gate: Gate | None = None, default_name: str | None = None, first: bool = False) -> ApiState:
    """Add the /v1 routes to an existing FastAPI app (e.g. Gradio's own `demo.app` after
    `demo.launch(prevent_thread_lock=True)`: first=True puts them before Gradio's routes)."""
    limits = limits or Limits.from_env()
    if api_key is ...:
        api_key = os.environ.get(API_KEY_ENV) or None
    gate = gate or Gate(limits.concurrency, limits.queue_size, limits.history)
    state = ApiState(ModelRegistry(models, default_name), gate, limits, api_key)
    router = build_router(state)
    n_before = len(app.router.routes)
    app.include_router(router)
    if first:
        added = app.router.routes[n_before:]
        del app.router.routes[n_before:]
        app.router.routes[0:0] = added
    app.state.bitnet = state
    return state


def attach_api(demo, models, **kw) -> ApiState:
    """The one way to serve the API beside a Gradio page: after
    `demo.launch(prevent_thread_lock=True)`, add the /v1 routes to the page's own FastAPI app,
    ahead of Gradio's routes. `kw` as for install_api (limits, gate, api_key, default_name)."""
    return install_api(demo.app, models, first=True, **kw)


def build_router(state: ApiState):
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse

    router = APIRouter()
    limits = state.limits

    def check_auth(request: Request) -> None:
        if not state.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, f"missing API key: send 'Authorization: Bearer <key>' (the server "
                                f"requires the key set in {API_KEY_ENV})", "invalid_request_error",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode("utf-8", "replace"), state.api_key.encode()):
            raise ApiError(401, "invalid API key", "invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def guarded(handler):
        @functools.wraps(handler)
        async def wrapper(request: Request, **kw):
            try:
                check_auth(request)
                return await handler(request, **kw)
            except ApiError as e:
                return e.response()
            except Exception as e:  # a bug: still JSON, with a message
                log.exception("internal error in %s", request.url.path)
                return ApiError(500, f"internal server error: {type(e).__name__}: {e}", "server_error",
                                code="internal_error").response()
        return wrapper

    @router.get("/v1/health")
    async def health():
        try:
            names, status = state.registry.names(), "ok"
        except ApiError:
            names, status = [], "loading"
        except Exception as e:  # a provider that fails: say so, do not crash
            names, status = [], f"error: {type(e).__name__}: {e}"
        return {"status": status, "models": names, **state.gate.snapshot(),
                "active_jobs": sum(not j.finished.is_set() for j in list(state.jobs.values()))}

    async def list_models(request: Request):
        mapping = await asyncio.to_thread(state.registry._mapping)
        return {"object": "list", "data": [state.registry.describe(n, v) for n, v in mapping.items()]}

    async def get_model(request: Request, model_id: str):
        mapping = await asyncio.to_thread(state.registry._mapping)
        model_id = state.registry.resolve(model_id, mapping, any_name=False)
        return state.registry.describe(model_id, mapping[model_id])

    async def chat_completions(request: Request):
        t0 = time.monotonic()
        body = await _read_body(request, limits)
        req = parse_chat_request(parse_json(body), limits)
        engine = await asyncio.to_thread(state.registry.get, req.model)
        req.model = await asyncio.to_thread(state.registry.resolve, req.model)  # the real id

        try:
            ticket = state.gate.admit()
        except Busy as e:
            raise ApiError(429, str(e), "rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        record = JobRecord(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", model=req.model)
        state.gate.records.append(record)
        started_job = False
        try:
            settings = await asyncio.to_thread(_settings_for, engine, req, limits)
            ok = await ticket.wait_async(limits.queue_timeout_s, request.is_disconnected)
            if not ok:
                record.state = "abandoned"
                if await request.is_disconnected():
                    record.stopped_by = "client"
                    raise ApiError(499, "client closed the request", code="client_closed")
                state.gate.counters["queue_timeouts"] += 1
                retry = state.gate.retry_after_s()
                raise ApiError(503, f"the server is busy: waited {limits.queue_timeout_s:g} s for the CPU; "
                                    f"retry after {retry} s", "server_error", code="queue_timeout",
                               headers={"Retry-After": str(retry)})
            job = Job(ticket, engine, req.chat, settings, asyncio.get_running_loop(), record,
                      limits.generation_timeout_s)
            for key in [k for k, j in list(state.jobs.items()) if j.finished.is_set()]:
                state.jobs.pop(key, None)
            state.jobs[record.id] = job
            job.start()
            started_job = True
            state.gate.counters["started"] += 1
        finally:
            if not started_job:
                ticket.release()
                if record.state == "queued":
                    record.state = "refused"  # e.g. the prompt does not fit the context

        meta = {"id": record.id, "created": int(time.time()), "model": req.model,
                "max_tokens": settings.max_new_tokens, "t0": t0}
        headers = {"x-request-id": record.id, "x-bitnet-max-tokens": str(settings.max_new_tokens)}
        if req.stream:
            headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return _JobStream(_sse(job, req, meta, state), job, state, media_type="text/event-stream",
                              headers=headers)
        try:
            return JSONResponse(await _collect(job, req, meta, request, state), headers=headers)
        finally:
            if not job.finished.is_set():
                job.stop("client")

    async def wrong_method(request: Request):
        raise ApiError(405, f"{request.method} is not allowed here; use POST /v1/chat/completions",
                       code="method_not_allowed", headers={"Allow": "POST"})

    async def not_found(request: Request, rest: str):
        raise ApiError(404, f"no route {request.method} /v1/{rest[:100]}; this server has GET /v1/models "
                            f"and POST /v1/chat/completions", code="unknown_url")

    router.add_api_route("/v1/models", guarded(list_models), methods=["GET"])
    router.add_api_route("/v1/models/{model_id:path}", guarded(get_model), methods=["GET"])
    router.add_api_route("/v1/chat/completions", guarded(chat_completions), methods=["POST"])
    router.add_api_route("/v1/chat/completions", guarded(wrong_method),
                         methods=["GET", "PUT", "PATCH", "DELETE"])
    router.add_api_route("/v1/{rest:path}", guarded(not_found),
                         methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    return router


MIN_TEMPERATURE = 1e-4  # below this a temperature means greedy decoding


def _settings_for(engine, req: ChatRequest, limits: Limits):
    """GenerationSettings for the request, max_tokens clamped to the context left after the
    prompt (raises ApiError 400 when the prompt alone does not fit)."""
    from runtime import GenerationSettings, PromptTooLongError

    try:
        prompt = engine.prompt_ids(messages=req.chat)
    except PromptTooLongError as e:
        # the API's own remedy (an HTTP client has no settings.truncate)
        raise ApiError(400, f"the messages are too long: they are {e.prompt_tokens} tokens with the "
                            f"chat template, and this model's context holds {e.context_length} "
                            "tokens for prompt and answer together; send fewer or shorter messages "
                            "(drop the oldest turns)", param="messages",
                       code="context_length_exceeded") from None
    except ValueError as e:
        raise bad(f"the messages cannot be used: {e}", "messages") from None
    context = int(engine.context_length)
    cap = min(limits.max_tokens_cap or context, context)
    wanted = req.wanted_tokens if req.wanted_tokens is not None else limits.default_max_tokens
    max_new = max(1, min(wanted, cap, context - len(prompt)))
    temperature = limits.default_temperature if req.temperature is None else req.temperature
    if temperature < MIN_TEMPERATURE:
        # greedy: logits / a subnormal temperature overflow float32 and the runtime's sampler
        # then draws from NaNs (found by the API fuzz; reported to the runtime)
        temperature = 0.0
    settings = GenerationSettings(max_new_tokens=max_new, temperature=float(temperature),
                                  top_k=req.top_k or 0, top_p=max(float(req.top_p if req.top_p is not None else 1.0), 1e-9),
                                  repetition_penalty=float(req.repetition_penalty or 1.0),
                                  seed=req.seed, stop=req.stop_list)
    try:
        settings.validate()
    except ValueError as e:
        raise bad(str(e)) from None
    return settings


FINISH = {"stop": "stop", "length": "length", "time": "length", "cancelled": "length"}


def _extras(event, record: JobRecord, meta: dict) -> dict:
    stats = event.stats.as_dict() if event is not None else {}
    stats.update(queue_wait_s=round(record.queued_s, 6), max_tokens=meta["max_tokens"],
                 engine_finish_reason=record.finish_reason, stopped_by=record.stopped_by,
                 latency_s=round(time.monotonic() - meta["t0"], 6))
    return stats


def _usage(event) -> dict:
    p = event.stats.prompt_tokens if event is not None else 0
    c = event.stats.new_tokens if event is not None else 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _collect(job: Job, req: ChatRequest, meta: dict, request, state: ApiState) -> dict:
    parts, last = [], None

    async def consume():
        nonlocal last
        async for event in job.events():
            parts.append(event.text)
            last = event

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected():
                job.stop("client")
        task.result()
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error",
                       code="generation_failed") from None
    finally:
        if not task.done():
            task.cancel()
    reason = FINISH.get(last.finish_reason if last else None, "stop")
    return {"id": meta["id"], "object": "chat.completion", "created": meta["created"],
            "model": meta["model"], "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": reason, "logprobs": None}],
            "usage": _usage(last), "bitnet": _extras(last, job.record, meta)}


def _chunk(meta: dict, delta: dict, finish=None, **extra) -> str:
    obj = {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"],
           "model": meta["model"], "system_fingerprint": None,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    obj.update(extra)
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(job: Job, req: ChatRequest, meta: dict, state: ApiState):
    try:
        yield _chunk(meta, {"role": "assistant", "content": ""})
        last = None
        try:
            async for event in job.events():
                last = event
                if event.text:
                    yield _chunk(meta, {"content": event.text})
        except Exception as e:
            err = ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error",
                           code="generation_failed")
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        reason = FINISH.get(last.finish_reason if last else None, "stop")
        extra = {"bitnet": _extras(last, job.record, meta)}
        if req.include_usage:
            yield _chunk(meta, {}, reason, **extra)
            obj = {"id": meta["id"], "object": "chat.completion.chunk", "created": meta["created"],
                   "model": meta["model"], "choices": [], "usage": _usage(last)}
            yield f"data: {json.dumps(obj)}\n\n"
        else:
            yield _chunk(meta, {}, reason, usage=_usage(last), **extra)
        yield "data: [DONE]\n\n"
    finally:
        if not job.finished.is_set():
            job.stop("client")


def _job_stream_class():
    from starlette.responses import StreamingResponse

    class JobStream(StreamingResponse):
        """A StreamingResponse that stops its generation when the client goes away
        (Starlette cancels the body iterator on http.disconnect; this catches every path)."""

        def __init__(self, content, job: Job, state: ApiState, **kw):
            super().__init__(content, **kw)
            self.job, self.state = job, state

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                if not self.job.finished.is_set():
                    self.job.stop("client")

    return JobStream


class _Lazy:
    cls = None


def _JobStream(*args, **kw):
    if _Lazy.cls is None:
        _Lazy.cls = _job_stream_class()
    return _Lazy.cls(*args, **kw)
