"""An OpenAI-compatible HTTP API over runtime engines: routes, streaming, the CPU gate.

    from server import attach_api, create_api
    attach_api(demo, {"bitnet-b1.58-2B-4T": engine})   # beside a launched Gradio page (app.py)
    uvicorn.run(create_api({"bitnet-b1.58-2B-4T": engine}), port=8000)   # or alone

Requests are read and validated by server/requests.py (pydantic models), models found by
server/models.py (ModelRegistry), generations admitted and run by server/scheduler.py (Jobs)
with server/work.py (what a request runs), answers shaped by server/responses.py, and every
error of every route goes through `api_error` here (the one error handler: the routes'
class, ApiRoute, which also counts each answer into server/metrics.py).

Routes (docs/SERVING.md lists them with every field): POST /v1/chat/completions and
/v1/completions (stream or not), GET /v1/models[/{id}], GET /health and /v1/health (open even
with a key; 503 while loading), GET /metrics (open), POST /tokenize, /detokenize and
GET /tokenizer_info. Every error is JSON in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status for what the client did
and 429/503 (with Retry-After) when the CPU is taken.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.responses import StreamingResponse

from runtime.gate import Busy, Gate, QueueTimeout

from .errors import ApiError, bad
from .limits import API_KEY_ENV, Limits
from .logprob_format import TokenText
from .metrics import ApiMetrics, add_metrics_route
from .models import ModelRegistry
from .requests import parse_json, read_body, read_chat_request, read_completion_request, to_api_error
from .responses import CHAT, TEXT, Meta, Results, collect, stream
from .scheduler import ClientGone, JobRecord, Jobs
from .work import Plan

log = logging.getLogger("bitnet.api")


@dataclass
class ApiState:
    registry: ModelRegistry
    gate: Gate
    limits: Limits
    api_key: str | None
    scheduler: Jobs
    metrics: ApiMetrics = None
    batchers: list = field(default_factory=list)  # the batched engines served so far (metrics, health)
    _names: dict = field(default_factory=dict)  # engine id -> TokenText

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = ApiMetrics(state=self.load)

    def load(self) -> dict:
        """Queue and batch occupancy for the metrics: requests waiting for the CPU (the gate's
        queue and the batchers'), generations running, sequences decoding."""
        batches = [b.stats() for b in self.batchers]
        return {"waiting": self.gate.waiting + sum(b["waiting"] for b in batches),
                "running": self.gate.running, "decoding": sum(b["decoding"] for b in batches)}

    def token_text(self, engine) -> TokenText:
        key = id(engine.tokenizer)
        if key not in self._names:
            self._names[key] = TokenText(engine.tokenizer)
        return self._names[key]

    @property
    def jobs(self) -> dict:
        """id -> Job of the recent generations (running ones included)."""
        return self.scheduler.jobs

    def records(self) -> list[JobRecord]:
        return list(self.scheduler.records)

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
    """A route of the API: whatever its handler or dependencies raise is answered by
    api_error, and every answer is counted into `metrics` (set by build_router's subclass)."""

    metrics: ApiMetrics | None = None

    def get_route_handler(self):
        handler = super().get_route_handler()
        path = "/v1/models/{id}" if self.path.startswith("/v1/models/") else self.path

        async def route(request: Request):
            try:
                response = await handler(request)
            except Exception as e:
                response = api_error(e, request).response()
            if self.metrics is not None:
                self.metrics.observe_request(path, response.status_code)
            return response

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
    gate = gate or limits.gate()
    state = ApiState(ModelRegistry(models, default_name), gate, limits, api_key, Jobs(gate, limits.history))
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


class ApiRoutes:
    """The handlers of the API's routes over one ApiState (build_router registers them)."""

    def __init__(self, state: ApiState):
        self.state, self.limits = state, state.limits

    def check_auth(self, request: Request) -> None:
        if not self.state.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, f"missing API key: send 'Authorization: Bearer <key>' (the server "
                                f"requires the key set in {API_KEY_ENV})", "invalid_request_error",
                           code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode("utf-8", "replace"), self.state.api_key.encode()):
            raise ApiError(401, "invalid API key", "invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def health(self):
        """200 when the models are ready, 503 while they load (or cannot), the state in the body:
        what a load balancer's or Kubernetes' probe reads."""
        try:
            names, status = self.state.registry.names(), "ok"
        except ApiError:
            names, status = [], "loading"
        except Exception as e:  # a provider that fails: say so, do not crash
            names, status = [], f"error: {type(e).__name__}: {e}"
        body = {"status": status, "models": names, **self.state.gate.snapshot(),
                "active_jobs": self.state.scheduler.active(), "batchers": [b.stats() for b in self.state.batchers]}
        ready = status == "ok"
        return JSONResponse(body, status_code=200 if ready else 503,
                            headers={} if ready else {"Retry-After": "10"})

    async def list_models(self):
        mapping = await asyncio.to_thread(self.state.registry._mapping)
        return {"object": "list", "data": [self.state.registry.describe(n, v) for n, v in mapping.items()]}

    async def get_model(self, model_id: str):
        mapping = await asyncio.to_thread(self.state.registry._mapping)
        model_id = self.state.registry.resolve(model_id, mapping, any_name=False)
        return self.state.registry.describe(model_id, mapping[model_id])

    def watch(self, engine) -> None:
        """Count the decode steps of a batched engine into the metrics (once per engine)."""
        batcher = engine.batcher
        if batcher is not None and batcher not in self.state.batchers:
            self.state.batchers.append(batcher)
            batcher.step_observers.append(self.state.metrics.observe_batch)

    async def engine_for(self, name: str):
        engine = await asyncio.to_thread(self.state.registry.get, name)
        self.watch(engine)
        return engine, await asyncio.to_thread(self.state.registry.resolve, name)  # the real id

    async def respond(self, admitted, meta: Meta, results: Results, req, request: Request, headers: dict):
        """The answer: SSE (the wait for the CPU inside the stream, with keep-alives) or JSON."""
        run = self.state.scheduler.run(admitted, queue_timeout_s=self.limits.queue_timeout_s,
                                       generation_timeout_s=self.limits.generation_timeout_s,
                                       disconnected=request.is_disconnected)
        if req.stream:
            headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            started: list = []  # the job, once it runs (JobStream stops it when the client leaves)
            body = stream(run, meta, results, req.include_usage, self.limits.keepalive_s, started.append)
            return JobStream(body, started, media_type="text/event-stream", headers=headers)
        job = await run
        try:
            return JSONResponse(await collect(job, results, request), headers=headers)
        finally:
            if not job.finished.is_set():
                job.stop("client")

    def meta_for(self, kind: str, record_id: str, model: str, engine, plan, t0: float, **kw) -> Meta:
        return Meta(id=record_id, created=int(time.time()), model=model, max_tokens=plan.settings.max_new_tokens,
                    t0=t0, kind=kind, names=self.state.token_text(engine), stop_ids=set(engine.stop_token_ids),
                    head=engine.lm_head, n=plan.n, metrics=self.state.metrics, **kw)

    async def chat_completions(self, request: Request):
        t0 = time.monotonic()
        req = await read_chat_request(request, self.limits)
        engine, req.model = await self.engine_for(req.model)

        def plan_for() -> Plan:
            prompt = req.prompt(engine)  # the chat template and tokenizer, once
            return Plan([prompt], req.settings(engine, self.limits, prompt), n=req.choices, messages=req.chat)

        admitted = await self.state.scheduler.admit(engine, req.model, plan_for, user=req.user)
        plan = admitted.plan
        meta = self.meta_for(CHAT, admitted.record.id, req.model, engine, plan, t0, want_logprobs=bool(req.logprobs))
        headers = {"x-request-id": admitted.record.id, "x-bitnet-max-tokens": str(plan.settings.max_new_tokens)}
        return await self.respond(admitted, meta, Results(meta, plan.choices), req, request, headers)

    async def completions(self, request: Request):
        t0 = time.monotonic()
        req = await read_completion_request(request, self.limits)
        engine, req.model = await self.engine_for(req.model)

        def plan_for() -> Plan:
            prompts = req.prompts(engine)
            settings = req.settings(engine, self.limits, prompts)
            score = req.logprobs if req.echo and req.logprobs is not None else None
            return Plan(prompts, settings, n=req.choices, score_top=score)

        admitted = await self.state.scheduler.admit(engine, req.model, plan_for, id_prefix="cmpl", user=req.user)
        plan = admitted.plan
        texts = [p if isinstance(p, str) else engine.tokenizer.decode(p, skip_special_tokens=True)
                 for p in req.prompt]
        meta = self.meta_for(TEXT, admitted.record.id, req.model, engine, plan, t0, echo=bool(req.echo),
                             want_logprobs=req.logprobs is not None, prompt_texts=texts)
        headers = {"x-request-id": admitted.record.id, "x-bitnet-max-tokens": str(plan.settings.max_new_tokens)}
        return await self.respond(admitted, meta, Results(meta, plan.choices), req, request, headers)

    # -- the tokenizer, as vLLM serves it (lm-eval's remote tokenizer reads these) -------------
    async def tokenizer_engine(self, model: str | None):
        return (await self.engine_for(model or ""))[0]

    async def tokenizer_info(self, model: str | None = None):
        engine = await self.tokenizer_engine(model)
        c = engine.config
        return {"eos_token": c.get("eos_token"), "bos_token": c.get("bos_token"), "pad_token": c.get("pad_token"),
                "chat_template": c.get("chat_template"), "model_max_length": engine.context_length,
                "tokenizer_class": "PreTrainedTokenizerFast"}

    async def tokenize(self, request: Request):
        body = parse_json(await read_body(request, self.limits))
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise bad("send {\"prompt\": \"text\"} (and optionally \"add_special_tokens\": bool, \"model\")",
                      "prompt", "invalid_type")
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise bad("add_special_tokens must be a boolean", "add_special_tokens", "invalid_type")
        engine = await self.tokenizer_engine(body.get("model") if isinstance(body.get("model"), str) else None)
        ids = engine.tokenizer.encode(body["prompt"], add_special_tokens=add).ids
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context_length}

    async def detokenize(self, request: Request):
        body = parse_json(await read_body(request, self.limits))
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad("send {\"tokens\": [token ids]}", "tokens", "invalid_type")
        engine = await self.tokenizer_engine(body.get("model") if isinstance(body.get("model"), str) else None)
        if tokens and not (0 <= min(tokens) and max(tokens) < engine.vocab_size):
            raise bad(f"token ids must be in [0, {engine.vocab_size})", "tokens")
        return {"prompt": engine.tokenizer.decode(tokens, skip_special_tokens=False)}

    async def wrong_method(self, request: Request):
        raise ApiError(405, f"{request.method} is not allowed here; use POST {request.url.path}",
                       code="method_not_allowed", headers={"Allow": "POST"})

    async def not_found(self, request: Request, rest: str):
        raise ApiError(404, f"no route {request.method} /v1/{rest[:100]}; this server has GET /v1/models, "
                            f"POST /v1/chat/completions and POST /v1/completions", code="unknown_url")


def build_router(state: ApiState):
    router = APIRouter(route_class=type("MeteredRoute", (ApiRoute,), {"metrics": state.metrics}))
    routes = ApiRoutes(state)
    auth = [Depends(routes.check_auth)]
    router.add_api_route("/health", routes.health, methods=["GET"])  # open even with a key
    router.add_api_route("/v1/health", routes.health, methods=["GET"])
    add_metrics_route(router, state.metrics)  # open too: numbers, no request content
    router.add_api_route("/tokenizer_info", routes.tokenizer_info, methods=["GET"], dependencies=auth)
    router.add_api_route("/tokenize", routes.tokenize, methods=["POST"], dependencies=auth)
    router.add_api_route("/detokenize", routes.detokenize, methods=["POST"], dependencies=auth)
    router.add_api_route("/v1/completions", routes.completions, methods=["POST"], dependencies=auth)
    router.add_api_route("/v1/models", routes.list_models, methods=["GET"], dependencies=auth)
    router.add_api_route("/v1/models/{model_id:path}", routes.get_model, methods=["GET"], dependencies=auth)
    router.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"], dependencies=auth)
    for path in ("/v1/chat/completions", "/v1/completions"):
        router.add_api_route(path, routes.wrong_method, methods=["GET", "PUT", "PATCH", "DELETE"], dependencies=auth)
    router.add_api_route("/v1/{rest:path}", routes.not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                         dependencies=auth)
    return router


class JobStream(StreamingResponse):
    """A StreamingResponse that stops its generation when the client goes away
    (Starlette cancels the body iterator on http.disconnect; this catches every path).
    `started`: a list the body appends the job to once it runs."""

    def __init__(self, content, started: list, **kw):
        super().__init__(content, **kw)
        self.started = started

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self.started:
                if not job.finished.is_set():
                    job.stop("client")
