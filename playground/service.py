"""The playground's back end: prepares the model, holds the engines, runs compare-mode turns.

No generation logic lives here: `runtime.Engine.stream` does that. This module decides which
engines run, in what order (ternary first, then the baseline, one after the other, so the
turn never times the two engines against each other on shared cores). The ternary engine is a
runtime.batcher.BatchedEngine: page visitors and API clients share its decode steps (the gate
shared with the HTTP API admits `batch` of them at once); the baselines are plain Engines that
run one visitor at a time (a second, one-slot gate),
and writes their answers into the conversation (playground/conversation.py), which the page
renders (playground/formatting.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from collections import deque

from runtime.batcher import DEFAULT_SLOTS
from runtime.cpus import available_threads
from server.scheduler import Busy, Gate

from .conversation import NO_BASELINE, TERNARY, model_messages, new_turn, turns_of
from .hardware import custom_ops_status, hardware_line
from .models import DEFAULT_MODEL, ResolvedModel, resolve_model

log = logging.getLogger("bitnet-onnx.app")

BASELINES = ("int2", "int4", "fp32")
UPDATE_EVERY_S = 0.1  # at most ~10 page updates per second while streaming
MAX_TIMELINE_POINTS = 480  # kept per answer (the chart shows at most half of them)
# Each engine's answer is cut after this many seconds (the engine's max_time_s), so a slow
# baseline cannot hold the one CPU slot for minutes; its tokens/s stay a fair rate.
TIME_LIMIT_S = float(os.environ.get("BITNET_APP_TIME_LIMIT_S", "120"))
DEFAULT_QUEUE_SIZE = 16


class NotReady(RuntimeError):
    pass


class TooLong(ValueError):
    pass


class CpuBusy(RuntimeError):
    """The CPU gate shared with the HTTP API refused the run or timed out."""


class ChatSettings:
    """The page's sampling settings; seed < 0 (the default) = a fresh random seed per turn."""

    def __init__(self, max_new_tokens=256, temperature=0.6, top_p=0.9, top_k=0,
                 repetition_penalty=1.0, seed=-1):
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.top_k, self.repetition_penalty, self.seed = top_k, repetition_penalty, seed

    def turn_seed(self) -> int:
        """The seed of one turn (both engines share it: the same tokens where their logits agree)."""
        if self.seed is None or int(self.seed) < 0:
            return secrets.randbelow(2**31)
        return int(self.seed)

    def to_runtime(self, seed: int, max_time_s: float | None = None):
        from runtime import GenerationSettings

        return GenerationSettings(
            max_new_tokens=max(1, int(self.max_new_tokens)), temperature=max(0.0, float(self.temperature)),
            top_k=max(0, int(self.top_k)), top_p=min(1.0, max(1e-3, float(self.top_p))),
            repetition_penalty=max(1e-3, float(self.repetition_penalty)), seed=int(seed), truncate=True,
            max_time_s=max_time_s)


class Playground:
    """Model preparation (in a background thread, so the page can show progress) and chats."""

    def __init__(self, model: str | None = DEFAULT_MODEL, threads: int | None = None,
                 variants=None, resolver=resolve_model, time_limit_s: float = TIME_LIMIT_S,
                 gate: Gate | None = None, batch: int = DEFAULT_SLOTS):
        self.model_spec = model or DEFAULT_MODEL
        self.threads = threads or available_threads()
        self.variants_requested = variants
        self.resolver = resolver
        self.time_limit_s = time_limit_s
        # The one admission layer of page and API: each engine run holds one slot, FIFO with
        # the API's requests (app.py passes the gate it shares with server/). A turn waiting
        # here is withdrawn at once by Stop.
        self.batch = max(0, int(batch))  # ternary streams decoded together (0: a plain Engine)
        self.gate = gate or Gate(concurrency=max(1, self.batch), queue_size=DEFAULT_QUEUE_SIZE)
        # The baselines are not batched: one baseline run at a time, whoever asks.
        self.baseline_gate = Gate(concurrency=1, queue_size=DEFAULT_QUEUE_SIZE)
        self.gate_timeout_s = 120.0
        self.state = "starting"  # starting | preparing | ready | failed
        self.error = ""
        self.resolved: ResolvedModel | None = None
        self.hardware: dict = {}
        self.log_lines: deque[str] = deque(maxlen=200)
        self.engines: dict = {}
        self._engine_lock = threading.Lock()
        self._ready = threading.Event()
        self._cancels: dict[str, set] = {}  # session -> cancel events of its turns
        self._cancels_lock = threading.Lock()
        self._active = 0
        self._thread: threading.Thread | None = None

    # -- start-up ------------------------------------------------------------------------------
    def progress(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        self.log_lines.append(line)
        print(f"[bitnet-onnx] {message}", file=sys.stderr, flush=True)

    def start(self, background: bool = True) -> None:
        if background:
            self._thread = threading.Thread(target=self._prepare, name="prepare-model", daemon=True)
            self._thread.start()
        else:
            self._prepare()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _prepare(self) -> None:
        self.state = "preparing"
        try:
            self.ops = custom_ops_status()
            self.hardware = {"cpu": self.ops.cpu, "kernel": self.ops.kernel, "threads": self.threads,
                             "custom_ops": "ok" if self.ops.ok else self.ops.reason}
            self.progress(hardware_line(self.hardware))
            if not self.ops.ok:
                self.progress(f"the ternary engine cannot run here: {self.ops.reason}; {self.ops.fix}")
            self.resolved = self.resolver(self.model_spec, variants=self.variants_requested,
                                          progress=self.progress)
            first = TERNARY if self.ops.ok else self.default_baseline_of(self.resolved.folder)
            if first is None:
                raise RuntimeError(f"the ternary engine cannot run here ({self.ops.reason}) and the "
                                   "model folder has no stock baseline")
            for variant in [first] + ([self.default_baseline()] if first == TERNARY else []):
                if variant == NO_BASELINE:
                    continue
                self.progress(f"loading the {variant} engine")
                started = time.time()
                self.engine(variant)
                self.progress(f"{variant} engine loaded and warmed up in {time.time() - started:.1f} s")
            self.state = "ready"
            self.progress(f"ready: serving {self.resolved.name}")
        except BaseException as e:  # noqa: BLE001 - shown on the page, not a crash
            self.state = "failed"
            self.error = f"{type(e).__name__}: {e}"
            self.progress(f"start-up failed: {self.error}")
            log.exception("model preparation failed")
        finally:
            self._ready.set()

    # -- engines ---------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        if self.resolved is None:
            return {}
        from runtime.folder import read_config

        try:
            return read_config(self.resolved.folder)
        except Exception:  # noqa: BLE001 - a folder that went away: nothing to show
            return {}

    @property
    def ternary_ok(self) -> bool:
        return getattr(getattr(self, "ops", None), "ok", True)

    def variants_available(self) -> list[str]:
        return list(self.config.get("variants", {}))

    def baselines(self) -> list[str]:
        have = self.variants_available()
        return [v for v in BASELINES if v in have] + [NO_BASELINE]

    def default_baseline(self) -> str:
        return self.baselines()[0]

    @staticmethod
    def default_baseline_of(folder) -> str | None:
        from runtime.folder import read_config

        have = read_config(folder).get("variants", {})
        return next((v for v in BASELINES if v in have), None)

    @property
    def context_length(self) -> int | None:
        c = self.config.get("context_length")
        return int(c) if c else None

    def engine(self, variant: str):
        """The engine of `variant`, loaded on first use. Besides the ternary engine at most one
        baseline stays loaded (an fp32 2B model is ~10 GB)."""
        with self._engine_lock:
            eng = self.engines.get(variant)
            if eng is not None:
                return eng
            from runtime import Engine

            if variant != TERNARY:
                for other in [v for v in self.engines if v != TERNARY]:
                    del self.engines[other]
            folder = self.resolved.folder if self.resolved else None
            eng = Engine(folder, variant=variant, threads=self.threads)
            self._warm_up(eng)
            if variant == TERNARY and self.batch:
                from runtime.batcher import BatchedEngine

                eng = BatchedEngine(eng, slots=self.batch)
            self.engines[variant] = eng
            return eng

    @staticmethod
    def _warm_up(eng) -> None:
        """One short generation, so the first user's timings do not include onnxruntime's
        first-run costs (allocations, kernel selection) on one engine and not the other."""
        from runtime import GenerationSettings

        try:
            eng.generate(messages=[{"role": "user", "content": "Hi"}],
                         settings=GenerationSettings(max_new_tokens=2, stop_token_ids=[]))
        except Exception as e:  # noqa: BLE001 - a warm-up failure shows up in the first chat
            log.warning("warm-up of %s failed: %s", eng, e)

    def api_models(self):
        """For the OpenAI-compatible API (server.create_api takes a callable): {model id: the
        ternary engine} once ready, None while the model is being prepared."""
        if self.state != "ready" or not self.engines:
            return None
        # the ternary engine; where the custom op cannot run, the baseline the page serves
        engine = self.engines.get(TERNARY) or next(iter(self.engines.values()))
        return {self.resolved.model_id: engine}

    # -- status ----------------------------------------------------------------------------------
    def banner_markdown(self) -> str:
        if self.state in ("starting", "preparing"):
            tail = "\n".join(list(self.log_lines)[-6:]) or "starting"
            return ("### ⏳ Preparing the model, please wait\n"
                    f"`{self.model_spec}`: the first start downloads and exports it once "
                    "(later starts reuse the cache).\n\n```text\n" + tail + "\n```")
        if self.state == "failed":
            return f"### ❌ The model could not be prepared\n```text\n{self.error}\n```"
        r = self.resolved
        cfg = self.config
        lines = [f"**Live model: {r.name}** · variants {', '.join(self.variants_available())} · "
                 f"context {cfg.get('context_length', '?')} tokens · {hardware_line(self.hardware)}"
                 f" · {self.serving_line()}"]
        if not self.ternary_ok:
            lines.append(f"⚠️ **The ternary engine is unavailable on this machine:** {self.ops.reason}. "
                         f"Fix: {self.ops.fix}. The stock baselines still run.")
        if r.notice:
            lines.append(f"⚠️ {r.notice}")
        if int(cfg.get("hidden_size") or 0) and int(cfg.get("hidden_size")) < 1024:
            lines.append("At this model size the timings mostly show per-token overheads; the "
                         "ternary kernels pay off on large models such as 2B4T.")
        return "\n\n".join(lines)

    def serving_line(self) -> str:
        """How visitors share the CPU (one short line on the page)."""
        if self.batch and self.ternary_ok:
            return (f"the ternary engine serves everyone in one batch (up to {self.batch} streams "
                    "per decode step, page and API); the baselines run one visitor at a time")
        return "one engine at a time"

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
            "active_generations": self._active,
            "engine_active_generations": {v: e.active_generations for v, e in list(self.engines.items())},
            "gate": self.gate.snapshot(),
            "batch": self.batch,
            "log": list(self.log_lines)[-20:],
        }

    # -- stop --------------------------------------------------------------------------------------
    def _register(self, session: str) -> threading.Event:
        ev = threading.Event()
        with self._cancels_lock:
            self._cancels.setdefault(session, set()).add(ev)
        return ev

    def _unregister(self, session: str, ev: threading.Event) -> None:
        with self._cancels_lock:
            events = self._cancels.get(session)
            if events is not None:
                events.discard(ev)
                if not events:
                    del self._cancels[session]

    def stop_pending(self, session: str) -> bool:
        """Is a turn of `session` running or waiting for the CPU?"""
        with self._cancels_lock:
            return bool(self._cancels.get(session))

    def stop(self, session: str) -> bool:
        """Stop every turn of `session`: a running engine ends after its current token, a turn
        waiting for the CPU leaves the queue at once."""
        with self._cancels_lock:
            events = list(self._cancels.get(session, ()))
        for ev in events:
            ev.set()
        return bool(events)

    # -- the chat -----------------------------------------------------------------------------------
    def check_message(self, engine, system: str, message: str) -> None:
        """TooLong when the message alone (with the system prompt) leaves no room to answer."""
        from runtime import PromptTooLongError

        context = engine.context_length
        if len(message) + len(system) > 64 * context:  # no tokenizer has 64 characters a token
            raise TooLong(f"Your message is too long for this model: {len(message):,} characters, "
                          f"and the model's context holds {context} tokens in all (prompt and "
                          "answer). Please shorten it.")
        msgs = ([{"role": "system", "content": system}] if system.strip() else []) + \
            [{"role": "user", "content": message}]
        try:
            engine.prompt_ids(messages=msgs)
        except PromptTooLongError as e:
            raise TooLong(
                f"Your message is too long for this model: with the chat template it is "
                f"{e.prompt_tokens} tokens, and the model's context holds {e.context_length} tokens "
                f"in all (prompt and answer). Please shorten it.") from None

    def compare(self, message: str, conversation, system: str, baseline: str,
                settings: ChatSettings, session: str = "default"):
        """Generator for one user message: the ternary engine answers, then the baseline answers
        the same prompt (the same history, token for token, the same seed). Yields
        (turns, final): the conversation with the new turn as it fills in."""
        if self.state != "ready":
            raise NotReady(self.banner_markdown() if self.state == "failed"
                           else "The model is still being prepared; try again in a moment.")
        message = message.replace("\r\n", "\n")
        system = system or ""
        first = TERNARY if self.ternary_ok else None
        engine_t = self.engine(first or self.default_baseline())
        self.check_message(engine_t, system, message)
        if baseline not in self.baselines():
            baseline = self.default_baseline()
        turns = [dict(t) for t in turns_of(conversation)]
        history = model_messages(turns, system)
        turn = new_turn(message, baseline, settings.turn_seed(), self.context_length,
                        dict(vars(settings), system=system))
        if not self.ternary_ok:
            turn["answers"][TERNARY].update(state="skipped", finish_reason="unavailable")
        turns.append(turn)
        gen_settings = settings.to_runtime(turn["seed"], self.time_limit_s)
        prompt = history + [{"role": "user", "content": message}]
        cancel = self._register(session)
        with self._cancels_lock:
            self._active += 1
        try:
            yield turns, False
            for variant in turn["answers"]:
                answer = turn["answers"][variant]
                if answer["state"] == "skipped":
                    continue
                if cancel.is_set():
                    answer.update(state="stopped", finish_reason="cancelled")
                    continue
                if variant not in self.engines:
                    answer["state"] = "loading"
                    yield turns, False
                engine = self.engine(variant)
                answer["weights_mb"] = engine.model_file_bytes / 2**20
                yield from self._run_in_slot(engine, answer, prompt, gen_settings, cancel, turns)
            yield turns, True
        finally:
            with self._cancels_lock:
                self._active -= 1
            self._unregister(session, cancel)
            for a in turn["answers"].values():  # closed mid-run: nothing is left "streaming"
                if a["state"] not in ("done", "stopped", "skipped"):
                    a.update(state="stopped", finish_reason=a["finish_reason"] or "cancelled")

    def _run_in_slot(self, engine, answer, prompt, gen_settings, cancel, turns):
        """Wait for the CPU slot (Stop gives up the place at once), then stream the answer.
        A baseline first waits for the baselines' own one-slot gate (they are not batched)."""
        if self.batch and engine is not self.engines.get(TERNARY):
            yield from self._hold(self.baseline_gate, answer, cancel, turns,
                                  lambda: self._run_in_shared_slot(engine, answer, prompt, gen_settings,
                                                                   cancel, turns))
        else:
            yield from self._run_in_shared_slot(engine, answer, prompt, gen_settings, cancel, turns)

    def _run_in_shared_slot(self, engine, answer, prompt, gen_settings, cancel, turns):
        yield from self._hold(self.gate, answer, cancel, turns,
                              lambda: self._stream(engine, answer, prompt, gen_settings, cancel, turns))

    def _hold(self, gate, answer, cancel, turns, body):
        """Run the generator `body()` holding a slot of `gate`; Stop withdraws a waiting turn."""
        try:
            ticket = gate.admit()
        except Busy as e:
            raise CpuBusy(f"The server is busy ({e}); try again in a moment.") from None
        try:
            if not ticket.try_take():
                answer["state"] = "gate"
                yield turns, False
            if not ticket.wait(self.gate_timeout_s, abandon=cancel):
                if cancel.is_set():
                    answer.update(state="stopped", finish_reason="cancelled")
                    return
                raise CpuBusy(f"Waited {self.gate_timeout_s:.0f} s for the CPU (API requests "
                              "ahead); try again in a moment.")
            yield from body()
        finally:
            ticket.release()

    def _stream(self, engine, answer, prompt, gen_settings, cancel, turns):
        """One engine's answer, streamed into `answer`; yields page states."""
        answer.update(state="prefill", text="", timeline=[(0.0, 0)])  # flat start = TTFT
        yield turns, False
        started = time.perf_counter()
        last_yield = 0.0
        stream = engine.stream(messages=prompt, settings=gen_settings, cancel=cancel)
        try:
            for event in stream:
                answer["text"] += event.text
                answer["stats"] = event.stats.as_dict()
                now = time.perf_counter()
                timeline = answer["timeline"]
                timeline.append((now - started, answer["stats"]["new_tokens"]))
                if len(timeline) > MAX_TIMELINE_POINTS:
                    del timeline[1::2]
                if event.done:
                    answer.update(state="done" if event.finish_reason != "cancelled" else "stopped",
                                  finish_reason=event.finish_reason)
                if event.done or now - last_yield >= UPDATE_EVERY_S:
                    last_yield = now
                    if not event.done:
                        answer["state"] = "streaming"
                    yield turns, False
        finally:
            if answer["finish_reason"] is None:  # closed mid-run (request cancelled)
                cancel.set()
            stream.close()
