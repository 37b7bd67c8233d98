"""The playground's back end: one object holding the model being served, its engines, the
CPU gates and the visitors' running turns, with each job in its own module:

    preparation.py  the model prepared in the background (progress on the page)
    engines.py      the engines, built on first use and kept
    gates.py        waiting for the CPU, shared with the HTTP API
    cancels.py      Stop: each session's running turns
    turns.py        one compare-mode turn (ternary, then the baseline)
    banner.py       the banner text

No generation logic lives here: `runtime.Engine.stream` does that.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque

from runtime.serving import DEFAULT_SLOTS
from runtime.cpus import available_threads
from runtime.folder import read_config

from .banner import banner_markdown
from .cancels import CancelRegistry
from .conversation import NO_BASELINE
from .engines import EngineCache
from .gates import DEFAULT_QUEUE_SIZE, GATE_TIMEOUT_S, CpuBusy, page_gates
from .models import DEFAULT_MODEL, ResolvedModel, resolve_model
from .preparation import prepare
from .settings import ChatSettings
from .turns import NotReady, TooLong, run_turn

__all__ = ["Playground", "ChatSettings", "CpuBusy", "NotReady", "TooLong", "DEFAULT_QUEUE_SIZE"]

BASELINES = ("int2", "int4", "fp32")
# Each engine's answer is cut after this many seconds (the engine's max_time_s), so a slow
# baseline cannot hold the one CPU slot for minutes; its tokens/s stay a fair rate.
TIME_LIMIT_S = float(os.environ.get("BITNET_APP_TIME_LIMIT_S", "120"))


class Playground:
    def __init__(self, model: str | None = DEFAULT_MODEL, threads: int | None = None,
                 variants=None, resolver=resolve_model, time_limit_s: float = TIME_LIMIT_S,
                 gate=None, batch: int = DEFAULT_SLOTS):
        self.model_spec = model or DEFAULT_MODEL
        self.threads = threads or available_threads()
        self.variants_requested = variants
        self.resolver = resolver
        self.time_limit_s = time_limit_s
        self.batch = max(0, int(batch))  # ternary streams decoded together (0: a plain Engine)
        # the one admission layer of page and API (app.py passes the gate it shares with
        # server/), and the baselines' own one-slot gate
        self.gate, self.baseline_gate = page_gates(self.batch, gate)
        self.gate_timeout_s = GATE_TIMEOUT_S
        self.state = "starting"  # starting | preparing | ready | failed
        self.error = ""
        self.ops = None  # custom_ops.status(), once preparation has asked
        self.resolved: ResolvedModel | None = None
        self._config_cache: tuple | None = None  # (folder, its config): see `config`
        self.hardware: dict = {}
        self.log_lines: deque[str] = deque(maxlen=200)
        self.engine_cache = EngineCache(self.threads, self.batch)
        self.cancels = CancelRegistry()
        self._ready = threading.Event()

    # -- start-up ------------------------------------------------------------------------------
    def progress(self, message: str) -> None:
        self.log_lines.append(f"{time.strftime('%H:%M:%S')} {message}")
        print(f"[bitnet-onnx] {message}", file=sys.stderr, flush=True)

    def start(self, background: bool = True) -> None:
        if background:
            threading.Thread(target=self._prepare, name="prepare-model", daemon=True).start()
        else:
            self._prepare()

    def _prepare(self) -> None:
        try:
            prepare(self)
        finally:
            self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    # -- the model folder --------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The served folder's bitnet_onnx.json, read once per served folder (the banner, status
        and every turn ask for it)."""
        if self.resolved is None:
            return {}
        folder = self.resolved.folder
        cached = self._config_cache
        if cached is not None and cached[0] == folder:
            return cached[1]
        try:
            config = read_config(folder)
        except Exception:  # noqa: BLE001 - a folder that went away: nothing to show
            return {}
        self._config_cache = (folder, config)
        return config

    @property
    def ternary_ok(self) -> bool:
        return self.ops is not None and self.ops.ok

    def variants_available(self) -> list[str]:
        return list(self.config.get("variants", {}))

    def baselines(self) -> list[str]:
        have = self.variants_available()
        return [v for v in BASELINES if v in have] + [NO_BASELINE]

    def default_baseline(self) -> str:
        return self.baselines()[0]

    @property
    def context_length(self) -> int | None:
        c = self.config.get("context_length")
        return int(c) if c else None

    # -- engines -------------------------------------------------------------------------------------
    @property
    def engines(self) -> dict:
        return self.engine_cache.engines

    def engine(self, variant: str):
        """The engine of `variant`, loaded on first use (playground/engines.py)."""
        return self.engine_cache.get(self.resolved.folder, variant)

    def api_models(self):
        """For the OpenAI-compatible API (server.create_api takes a callable): {model id: the
        engine it serves} once ready, None while the model is being prepared."""
        if self.state != "ready" or not self.engines:
            return None
        return {self.resolved.model_id: self.engine_cache.served()}

    # -- the chat -------------------------------------------------------------------------------------
    def compare(self, message: str, conversation, system: str, baseline: str,
                settings: ChatSettings, session: str = "default"):
        """Generator for one visitor message (playground/turns.py): yields (turns, final), the
        conversation with the new turn as it fills in."""
        return run_turn(self, message, conversation, system, baseline, settings, session)

    def stop_pending(self, session: str) -> bool:
        """Is a turn of `session` running or waiting for the CPU?"""
        return self.cancels.pending(session)

    def stop(self, session: str) -> bool:
        """Stop every turn of `session`: a running engine ends after its current token, a turn
        waiting for the CPU leaves the queue at once."""
        return self.cancels.stop(session)

    # -- what the page shows ----------------------------------------------------------------------------
    def banner_markdown(self) -> str:
        return banner_markdown(self)

    def status(self) -> dict:
        r = self.resolved
        return {
            "state": self.state,
            "error": self.error,
            "model": r.name if r else None,
            "model_id": r.model_id if r else None,
            "requested": self.model_spec,
            "folder": r.folder if r else None,
            "fallback": bool(r and r.fallback),
            "notice": r.notice if r else "",
            "variants": self.variants_available(),
            "baselines": self.baselines() if self.state == "ready" else [],
            "loaded_engines": list(self.engines),
            "context_length": self.context_length,
            "hardware": self.hardware,
            "active_generations": self.cancels.active,
            "engine_active_generations": {v: e.active_generations for v, e in list(self.engines.items())},
            "gate": self.gate.snapshot(),
            "batch": self.batch,
            "log": list(self.log_lines)[-20:],
        }
