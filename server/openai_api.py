"""An OpenAI-compatible HTTP API over runtime engines, as a FastAPI app Gradio mounts onto.

    from server import create_api
    api = create_api({"bitnet-b1.58-2B-4T": engine})          # or a provider, see ModelRegistry
    app = gr.mount_gradio_app(api, demo, path="/")            # page at /, API at /v1
    uvicorn.run(app, host="0.0.0.0", port=7860)

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
from .scheduler import Busy, Gate, Job, JobRecord

log = logging.getLogger("bitnet.api")

ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Request fields we accept but that change nothing (OpenAI clients send some of them).
IGNORED_OK = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction",
              "reasoning_effort", "modalities", "audio", "web_search_options", "safety_identifier",
              "prompt_cache_key", "verbosity", "function_call", "functions"}


# -- request parsing -------------------------------------------------------------------------
@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


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


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


def _number(body, name, lo, hi, default=None, integer=False, lo_open=False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise bad(f"{name} must be {kind}, got {_type_name(v)}", name, "invalid_type")
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(f"{name} must be finite", name)
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise bad(f"{name} must be in {rng}, got {v}", name)
    return v


def _text_content(content, i: int, role: str) -> str:
    where = f"messages[{i}].content"
    if content is None:
        if role == "assistant":
            return ""
        raise bad(f"{where} must be a string or an array of text parts, got null", where, "invalid_type")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise bad(f"{where}[{j}] must be an object like {{\"type\": \"text\", \"text\": ...}}, "
                          f"got {_type_name(part)}", where, "invalid_type")
            if part.get("type") != "text":
                raise bad(f"{where}[{j}]: only text parts are supported (type 'text'), got type "
                          f"{str(part.get('type'))[:40]!r}", where, "unsupported_content")
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}].text must be a string", where, "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where} must be a string or an array of text parts, got {_type_name(content)}",
              where, "invalid_type")


def parse_chat_request(body, limits: Limits) -> ChatRequest:
    """Check a decoded JSON body; raise ApiError (4xx) naming the first problem."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_type_name(body)}", code="invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required and must be a non-empty string (see GET /v1/models)", "model",
                  "invalid_type" if "model" in body else "missing_field")
    msgs = body.get("messages")
    if msgs is None:
        raise bad("messages is required: an array of {\"role\", \"content\"} objects", "messages", "missing_field")
    if not isinstance(msgs, list):
        raise bad(f"messages must be an array, got {_type_name(msgs)}", "messages", "invalid_type")
    if not msgs:
        raise bad("messages must not be empty", "messages")
    if len(msgs) > limits.max_messages:
        raise bad(f"too many messages: {len(msgs)} (the limit is {limits.max_messages})", "messages",
                  "too_many_messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object, got {_type_name(m)}", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLE_MAP:
            raise bad(f"messages[{i}].role must be one of system, developer, user, assistant; got "
                      f"{str(role)[:40]!r}", f"messages[{i}].role",
                      "unsupported_role" if isinstance(role, str) else "invalid_type")
        if m.get("tool_calls"):
            raise bad(f"messages[{i}]: tool calls are not supported", f"messages[{i}].tool_calls", "unsupported")
        messages.append({"role": ROLE_MAP[role], "content": _text_content(m.get("content"), i, role)})

    for name in ("tools", "tool_choice", "logprobs", "top_logprobs", "logit_bias"):
        if body.get(name) not in (None, False, [], {}, "none"):
            raise bad(f"{name} is not supported by this server", name, "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format: only {\"type\": \"text\"} is supported", "response_format", "unsupported")
    n = _number(body, "n", 1, None, 1, integer=True)
    if n != 1:
        raise bad("n must be 1 (one choice per request)", "n", "unsupported")
    for name in ("frequency_penalty", "presence_penalty"):
        _number(body, name, -2.0, 2.0)  # accepted and ignored (use repetition_penalty)

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad(f"stream must be a boolean, got {_type_name(stream)}", "stream", "invalid_type")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad(f"stream_options must be an object, got {_type_name(opts)}", "stream_options", "invalid_type")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("stream_options.include_usage must be a boolean", "stream_options", "invalid_type")

    max_tokens = _number(body, "max_completion_tokens", 1, None, None, integer=True)
    mt = _number(body, "max_tokens", 1, None, None, integer=True)
    if mt is not None:
        max_tokens = mt if max_tokens is None else min(mt, max_tokens)

    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    top_k = _number(body, "top_k", 0, None, 0, integer=True)
    rep = _number(body, "repetition_penalty", 0.0, 10.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad(f"seed must be an integer, got {_type_name(seed)}", "seed", "invalid_type")
        seed = seed % (1 << 64)  # any integer, as OpenAI accepts; numpy wants it non-negative

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop must be a string or an array of strings", "stop", "invalid_type")
    if len(stop) > limits.max_stop:
        raise bad(f"at most {limits.max_stop} stop strings, got {len(stop)}", "stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise bad(f"a stop string may have at most {limits.max_stop_chars} characters", "stop")

    return ChatRequest(model=model, messages=messages, stream=stream, include_usage=include_usage,
                       max_tokens=max_tokens, temperature=temperature,
                       top_p=max(float(top_p), 1e-9), top_k=int(top_k),
                       repetition_penalty=float(rep), seed=seed, stop=stop)


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
            job = Job(ticket, engine, req.messages, settings, asyncio.get_running_loop(), record,
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
        prompt = engine.prompt_ids(messages=req.messages)
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
    wanted = req.max_tokens if req.max_tokens is not None else limits.default_max_tokens
    max_new = max(1, min(wanted, cap, context - len(prompt)))
    temperature = limits.default_temperature if req.temperature is None else req.temperature
    if temperature < MIN_TEMPERATURE:
        # greedy: logits / a subnormal temperature overflow float32 and the runtime's sampler
        # then draws from NaNs (found by the API fuzz; reported to the runtime)
        temperature = 0.0
    settings = GenerationSettings(max_new_tokens=max_new, temperature=float(temperature),
                                  top_k=req.top_k, top_p=req.top_p,
                                  repetition_penalty=req.repetition_penalty, seed=req.seed,
                                  stop=list(req.stop))
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
