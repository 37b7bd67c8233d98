"""Prometheus metrics of the API (the prometheus_client package), served at GET /metrics.

    metrics = ApiMetrics(state=lambda: {"waiting": 2, "running": 1, "decoding": 1})
    add_metrics_route(router, metrics)      # GET /metrics
    metrics.observe_request(path, status)   # by the API's routes (server/openai_api.py, ApiRoute)
    timer = metrics.request_timer()         # per generation: TTFT and time between tokens
    timer.tokens(n_new); ...; timer.finish(prompt_tokens, completion_tokens)
    metrics.observe_batch(4)                # the batcher's decode step sizes (a callback)

Each API has its own registry (tests and several apps in one process never collide). The
times are the server's: request arrival to the first token leaving the engine, and between
tokens as the engine hands them over (the network adds its own).
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "bitnet"
# Routes reported by their own path; anything else (404s of scanners, Gradio's page) is "other"
# so the label set stays bounded.
KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{id}", "/v1/health", "/health",
               "/metrics", "/tokenize", "/detokenize", "/tokenizer_info")
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TBT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class RequestTimer:
    """One generation's token timing, observed into its ApiMetrics as tokens arrive."""

    def __init__(self, metrics: "ApiMetrics", started: float):
        self.metrics, self.started = metrics, started
        self.last: float | None = None
        self._finished = False

    def tokens(self, count: int) -> None:
        """`count` new tokens arrived now (an engine event)."""
        if count <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.started)
            count -= 1
        elif count:
            gap = (now - self.last) / count
            for _ in range(count):
                self.metrics.time_between_tokens.observe(gap)
        self.last = now

    def finish(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The generation ended: count its tokens (once)."""
        if self._finished:
            return
        self._finished = True
        self.metrics.prompt_tokens.inc(max(0, int(prompt_tokens)))
        self.metrics.completion_tokens.inc(max(0, int(completion_tokens)))


class ApiMetrics:
    def __init__(self, state: Callable[[], dict] | None = None):
        """`state`: called at each scrape, returns {"waiting", "running", "decoding"} (requests
        waiting for the CPU, generations running, sequences in the current decode batch)."""
        self.state = state
        r = self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered, by path and status code",
                                ["path", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished generations",
                                     registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge(f"{PREFIX}_queue_length", "Requests waiting for the CPU", registry=r)
        self.running = Gauge(f"{PREFIX}_running_requests", "Generations running", registry=r)
        self.decoding = Gauge(f"{PREFIX}_batch_size_current", "Sequences in the current decode batch",
                              registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Sequences per decode step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Request arrival to the first generated token", buckets=TTFT_BUCKETS, registry=r)
        self.time_between_tokens = Histogram(f"{PREFIX}_time_between_tokens_seconds",
                                             "Time between consecutive generated tokens of a request",
                                             buckets=TBT_BUCKETS, registry=r)

    def request_timer(self, started: float | None = None) -> RequestTimer:
        """A timer for one generation; `started`: time.monotonic() of the request's arrival."""
        return RequestTimer(self, time.monotonic() if started is None else started)

    def observe_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in KNOWN_PATHS else "other", str(int(status))).inc()

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        if self.state is not None:
            s = self.state()
            self.queue_length.set(s.get("waiting", 0))
            self.running.set(s.get("running", 0))
            self.decoding.set(s.get("decoding", 0))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def add_metrics_route(router, metrics: ApiMetrics) -> None:
    """GET /metrics on a FastAPI app or router (open even when the API has a key, as health is:
    scrapers carry no key, and the numbers hold no request content)."""
    from starlette.responses import Response

    async def scrape():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    router.add_api_route("/metrics", scrape, methods=["GET"], include_in_schema=False)
