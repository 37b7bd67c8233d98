"""Which engines the API serves, by model id, and how a request's `model` name finds one."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from .errors import ApiError

log = logging.getLogger("bitnet.api")


class ModelRegistry:
    """Which engines the API serves, by model id.

    `models` is one of:
    - an Engine (served under `default_name`, or the name of its model folder);
    - a mapping {model id: Engine or zero-argument callable returning an Engine (loaded on
      first use, once)};
    - a zero-argument callable returning such a mapping, or None while the models are still
      being prepared (the API then answers 503 "loading" with Retry-After).
    """

    def __init__(self, models, default_name: str | None = None):
        self._source = models
        self._default_name = default_name
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.created = int(time.time())

    def _mapping(self) -> dict:
        source = self._source
        if _is_engine(source):
            name = self._default_name or os.path.basename(os.path.normpath(source.model_dir))
            return {name: source}
        if callable(source) and not isinstance(source, dict):
            source = source()
            if source is None:
                raise ApiError(503, "the model is still loading; retry shortly", "server_error",
                               code="model_loading", headers={"Retry-After": "10"})
            if _is_engine(source):
                return ModelRegistry(source, self._default_name)._mapping()
        return dict(source)

    def names(self) -> list[str]:
        return list(self._mapping())

    def resolve(self, name: str, mapping: dict | None = None, any_name: bool = True) -> str:
        """The served id a request's `model` names: the id itself; the id's last part or any
        case (the documented "bitnet-b1.58-2B-4T" for "microsoft/bitnet-b1.58-2B-4T"); and,
        when one model is served, any name at all (as llama.cpp's server and Ollama do).
        ApiError 404 otherwise."""
        mapping = self._mapping() if mapping is None else mapping
        if name in mapping:
            return name
        folded = name.strip().lower()
        for served in mapping:
            if folded in (served.lower(), served.rsplit("/", 1)[-1].lower()):
                return served
        if any_name and len(mapping) == 1:
            return next(iter(mapping))
        raise ApiError(404, f"the model {name!r} does not exist; this server has: "
                            f"{', '.join(mapping) or 'none'} (see GET /v1/models)",
                       param="model", code="model_not_found")

    def get(self, name: str):
        """The engine of `name` (see resolve; loading it on first use)."""
        mapping = self._mapping()
        name = self.resolve(name, mapping)
        value = mapping[name]
        if _is_engine(value):
            return value
        with self._lock:
            if name not in self._loaded:
                try:
                    self._loaded[name] = value()
                except Exception as e:  # not cached: the next request tries again
                    log.exception("loading model %s failed", name)
                    raise ApiError(503, f"the model {name!r} cannot be loaded now: {type(e).__name__}: {e}",
                                   "server_error", param="model", code="model_unavailable",
                                   headers={"Retry-After": "30"}) from None
            return self._loaded[name]

    def describe(self, name: str, value) -> dict:
        info = {"id": name, "object": "model", "created": self.created, "owned_by": "bitnet-onnx"}
        if _is_engine(value):
            info.update(variant=value.variant, context_length=value.context_length)
        return info


def _is_engine(x) -> bool:
    return hasattr(x, "stream") and hasattr(x, "context_length")


