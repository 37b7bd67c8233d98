"""Limits of the HTTP API, with their defaults and the environment variables that set them.

Every limit has an environment variable `BITNET_API_<NAME>` (upper case), read by
`Limits.from_env()`; `create_api(limits=Limits(...))` takes them directly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from runtime.gate import Gate
from runtime.serving import is_batched

API_KEY_ENV = "BITNET_API_KEY"  # unset or empty: the API is open
ENV_PREFIX = "BITNET_API_"


@dataclass
class Limits:
    # request size and shape
    max_body_bytes: int = 1 << 20  # larger bodies: 413
    max_messages: int = 256  # more messages: 400
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 256  # characters per stop string
    max_prompts: int = 64  # prompts in one /v1/completions request (an array of prompts)
    # generation
    default_max_tokens: int = 256  # when the request gives none (clamped to the context too)
    max_tokens_cap: int = 0  # upper bound for max_tokens; 0 = the model's context length
    default_temperature: float = 1.0  # OpenAI's default
    # concurrency: the CPU runs `concurrency` generations at once; `queue_size` more may wait
    concurrency: int = 1
    queue_size: int = 8  # more waiting requests: 429 with Retry-After
    queue_timeout_s: float = 120.0  # waited longer for the CPU: 503 with Retry-After
    generation_timeout_s: float = 300.0  # a generation running longer is stopped (finish "length")
    body_timeout_s: float = 15.0  # a request body that takes longer to arrive: 408
    keepalive_s: float = 10.0  # a stream sends an SSE comment after this long without a byte
    history: int = 256  # finished generations remembered for /v1/health and tests

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Limits":
        """Defaults, then BITNET_API_* environment variables, then `overrides`."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw.strip() == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(float(raw)) if kind is int else kind(raw)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        values.update(overrides)
        limits = cls(**values)
        limits.validate()
        return limits

    @classmethod
    def for_batch(cls, batch: int, variant: str = "ternary", environ=None) -> "Limits":
        """from_env for a server run with --batch `batch` (runtime/serving.py): when `variant`
        is batched, `concurrency` is the batcher's slots (they share each decode step)."""
        if is_batched(variant, batch):
            return cls.from_env(environ, concurrency=batch)
        return cls.from_env(environ)

    def gate(self) -> Gate:
        """A CPU gate with these limits' concurrency and queue size."""
        return Gate(self.concurrency, self.queue_size)

    def validate(self) -> None:
        for name in ("max_body_bytes", "max_messages", "default_max_tokens", "concurrency", "max_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"limit {name} must be >= 1, got {getattr(self, name)}")
        for name in ("queue_size", "max_tokens_cap", "max_stop", "history"):
            if getattr(self, name) < 0:
                raise ValueError(f"limit {name} must be >= 0, got {getattr(self, name)}")
        for name in ("queue_timeout_s", "generation_timeout_s", "body_timeout_s", "keepalive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"limit {name} must be > 0, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def env_names() -> dict:
        """{field: environment variable} for the docs."""
        return {f.name: ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Limits)}
