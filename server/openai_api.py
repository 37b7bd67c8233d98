"""An OpenAI-compatible HTTP API over runtime engines: routes, streaming, the CPU gate.

    from server import attach_api, create_api
    attach_api(demo, {"bitnet-b1.58-2B-4T": engine})   # beside a launched Gradio page (app.py)
    uvicorn.run(create_api({"bitnet-b1.58-2B-4T": engine}), port=8000)   # or alone

Requests are read and validated by server/requests.py (pydantic models), models found by
server/models.py (ModelRegistry), generations admitted and run by server/scheduler.py (Jobs),
and every error of every route goes through `api_error` here (the one error handler: the
routes' class, ApiRoute) into server/errors.py's shape.

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions (stream or not),
GET /v1/health (open even with a key: queue state only). Every error is JSON in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status for what the client did
and 429/503 (with Retry-After) when the CPU is taken.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.responses import StreamingResponse

from .errors import ApiError
from .limits import API_KEY_ENV, Limits
from .models import ModelRegistry
from .requests import ChatRequest, read_chat_request, to_api_error
from .scheduler import Busy, ClientGone, Gate, Job, JobRecord, Jobs, QueueTimeout

log = logging.getLogger("bitnet.api")


@dataclass
class ApiState:
    registry: ModelRegistry
    gate: Gate
    limits: Limits
    api_key: str | None
    scheduler: Jobs

    @property
    def jobs(self) -> dict:
        """id -> Job of the recent generations (running ones included)."""
        return self.scheduler.jobs

    def records(self) -> list[JobRecord]:
        return list(self.gate.records)

    def engine_idle(self) -> bool:
        """No generation running or waiting, and no worker thread inside an engine."""
        return self.gate.idle() and not self.scheduler.active()


def api_error(e: Exception, request: Request | None = None) -> ApiError:
    """The one error handler: any exception a route raises, as the ApiError to answer."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ValidationError):
        return to_api_error(e)
    if isinstance(e, Busy):
        return ApiError(429, str(e), "rate_limit_error", code="server_busy",
                        headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, QueueTimeout):
        return ApiError(503, str(e), "server_error", code="queue_timeout",
                        headers={"Retry-After": str(e.retry_after_s)})
    if isinstance(e, ClientGone):
        return ApiError(499, str(e), code="client_closed")
    # a bug: still JSON, with a message
    log.error("internal error in %s", request.url.path if request is not None else "the API", exc_info=e)
    return ApiError(500, f"internal server error: {type(e).__name__}: {e}", "server_error", code="internal_error")


class ApiRoute(APIRoute):
    """A /v1 route: whatever its handler or dependencies raise is answered by api_error."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except Exception as e:
                return api_error(e, request).response()

        return route


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
    state = ApiState(ModelRegistry(models, default_name), gate, limits, api_key, Jobs(gate))
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

    router = APIRouter(route_class=ApiRoute)
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

    async def health():
        try:
            names, status = state.registry.names(), "ok"
        except ApiError:
            names, status = [], "loading"
        except Exception as e:  # a provider that fails: say so, do not crash
            names, status = [], f"error: {type(e).__name__}: {e}"
        return {"status": status, "models": names, **state.gate.snapshot(),
                "active_jobs": state.scheduler.active()}

    async def list_models():
        mapping = await asyncio.to_thread(state.registry._mapping)
        return {"object": "list", "data": [state.registry.describe(n, v) for n, v in mapping.items()]}

    async def get_model(model_id: str):
        mapping = await asyncio.to_thread(state.registry._mapping)
        model_id = state.registry.resolve(model_id, mapping, any_name=False)
        return state.registry.describe(model_id, mapping[model_id])

    async def chat_completions(request: Request):
        t0 = time.monotonic()
        req = await read_chat_request(request, limits)
        engine = await asyncio.to_thread(state.registry.get, req.model)
        req.model = await asyncio.to_thread(state.registry.resolve, req.model)  # the real id
        job = await state.scheduler.start(
            engine, req.model, req.chat, lambda: req.settings(engine, limits),
            queue_timeout_s=limits.queue_timeout_s, generation_timeout_s=limits.generation_timeout_s,
            disconnected=request.is_disconnected)
        max_tokens = job.settings.max_new_tokens
        meta = {"id": job.record.id, "created": int(time.time()), "model": req.model,
                "max_tokens": max_tokens, "t0": t0}
        headers = {"x-request-id": job.record.id, "x-bitnet-max-tokens": str(max_tokens)}
        if req.stream:
            headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return JobStream(_sse(job, req, meta), job, media_type="text/event-stream", headers=headers)
        try:
            return JSONResponse(await _collect(job, meta, request), headers=headers)
        finally:
            if not job.finished.is_set():
                job.stop("client")

    async def wrong_method(request: Request):
        raise ApiError(405, f"{request.method} is not allowed here; use POST /v1/chat/completions",
                       code="method_not_allowed", headers={"Allow": "POST"})

    async def not_found(request: Request, rest: str):
        raise ApiError(404, f"no route {request.method} /v1/{rest[:100]}; this server has GET /v1/models "
                            f"and POST /v1/chat/completions", code="unknown_url")

    auth = [Depends(check_auth)]
    router.add_api_route("/v1/health", health, methods=["GET"])  # open even with a key
    router.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=auth)
    router.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"], dependencies=auth)
    router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=auth)
    router.add_api_route("/v1/chat/completions", wrong_method, methods=["GET", "PUT", "PATCH", "DELETE"],
                         dependencies=auth)
    router.add_api_route("/v1/{rest:path}", not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                         dependencies=auth)
    return router


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


async def _collect(job: Job, meta: dict, request) -> dict:
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


async def _sse(job: Job, req: ChatRequest, meta: dict):
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


class JobStream(StreamingResponse):
    """A StreamingResponse that stops its generation when the client goes away
    (Starlette cancels the body iterator on http.disconnect; this catches every path)."""

    def __init__(self, content, job: Job, **kw):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.finished.is_set():
                self.job.stop("client")
