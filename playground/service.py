"""The playground's back end: prepares the model, holds the engines, runs compare-mode chats.

No generation logic lives here: `runtime.Engine.stream` does that. This module decides which
engines run, in what order (ternary first, then the baseline, never both at once, so neither
is timed while the other holds the cores), and turns their events into what the page shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import logging
import os
import sys
import threading
import time
from collections import deque

from .models import DEFAULT_MODEL, ResolvedModel, resolve_model

log = logging.getLogger("bitnet-onnx.app")

BASELINES = ("int2", "int4", "fp32")
NO_BASELINE = "none"
LABELS = {"ternary": "ternary (BitLinear)", "int2": "int2 (stock ORT MatMulNBits 2-bit)",
          "int4": "int4 (stock ORT MatMulNBits 4-bit)", "fp32": "fp32 (stock ORT MatMul)"}
SHORT = {"ternary": "ternary", "int2": "int2", "int4": "int4", "fp32": "fp32"}
UPDATE_EVERY_S = 0.1  # at most ~10 page updates per second per pane while streaming
WAITING = "*waiting: the baseline runs after the ternary engine, so the two never share the cores*"
MAX_TIMELINE_POINTS = 240
# Each engine's answer is cut after this many seconds (checked between tokens), so a slow
# baseline cannot hold the one CPU slot for minutes; its tokens/s stay a fair rate.
TIME_LIMIT_S = float(os.environ.get("BITNET_APP_TIME_LIMIT_S", "120"))


class _EitherSet:
    """A cancel flag for one engine run: the user's Stop, or the run's time limit."""

    def __init__(self, user: threading.Event):
        self.user = user
        self.timed_out = False

    def is_set(self) -> bool:
        return self.user.is_set() or self.timed_out


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota
    (containers such as a Space's often see all the host's cores but get 2 CPUs of time;
    one thread per visible core would oversubscribe them and spoil the timings)."""
    import math

    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            with open(path) as f:
                parts = f.read().split()
            if path.endswith("cpu.max"):
                quota, period = parts[0], parts[1] if len(parts) > 1 else "100000"
            else:
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                    quota, period = parts[0], f.read().strip()
            if quota not in ("max", "-1") and float(period) > 0:
                n = min(n, max(1, math.ceil(float(quota) / float(period))))
            break
        except (OSError, ValueError, IndexError):
            continue
    return max(1, n)


class NotReady(RuntimeError):
    pass


class TooLong(ValueError):
    pass


class CpuBusy(RuntimeError):
    """The CPU gate shared with the HTTP API refused the run or timed out."""


# -- text helpers --------------------------------------------------------------------------------

def flatten_content(content) -> str:
    """Chatbot message content as text: Gradio 6 sends a list of blocks
    ([{"type": "text", "text": ...}]); older clients send a string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if isinstance(content.get("text"), str):
            return content["text"]
        return flatten_content(content.get("content"))
    if isinstance(content, (list, tuple)):
        return "".join(flatten_content(b) for b in content)
    return str(content)


def shown(text: str) -> str:
    """Text as the chatbot displays it: HTML escaped, so markup and scripts show as text."""
    return html.escape(text, quote=False)


def unshown(text: str) -> str:
    return html.unescape(text)


def history_to_messages(history) -> list[dict]:
    """Chatbot value (display form) -> raw [{"role", "content": str}] for the chat template.
    Placeholders of a pane that never answered are dropped with their user turn."""
    out = []
    for m in history or []:
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        if role not in ("user", "assistant"):
            continue
        if (m.get("metadata") or {}).get("title"):  # notes we add, not conversation
            continue
        out.append({"role": role, "content": unshown(flatten_content(m.get("content")))})
    return out


def user_turns(history) -> int:
    return sum(1 for m in history_to_messages(history) if m["role"] == "user")


def drop_last_exchange(history) -> tuple[list, str | None]:
    """Remove the last user message and everything after it; return (history, its raw text)."""
    history = list(history or [])
    for i in range(len(history) - 1, -1, -1):
        m = history[i]
        if isinstance(m, dict) and m.get("role") == "user":
            return history[:i], unshown(flatten_content(m.get("content")))
    return history, None


def _fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms" if seconds >= 0.01 \
        else f"{seconds * 1000:.1f} ms"


def stats_markdown(variant: str, stats: dict | None, state: str, weights_mb: float | None) -> str:
    """One pane's stats line."""
    head = f"**{LABELS.get(variant, variant)}** · {state}"
    if not stats:
        return head
    parts = [
        f"TTFT **{_fmt_s(stats['ttft_s'])}**" if stats.get("new_tokens") else "TTFT –",
        f"prefill **{stats['prefill_tokens_per_s']:.1f} tok/s**" if stats.get("new_tokens") else "prefill –",
        f"decode **{stats['decode_tokens_per_s']:.1f} tok/s**" if stats.get("new_tokens", 0) > 1 else "decode –",
        f"tokens **{stats.get('prompt_tokens', 0)}** in + **{stats.get('new_tokens', 0)}** out",
    ]
    mem = []
    if weights_mb is not None:
        mem.append(f"weights **{_fmt_mb(weights_mb)}**")
    if stats.get("rss_mb"):
        mem.append(f"process RSS {_fmt_mb(stats['rss_mb'])}")
    if mem:
        parts.append(" · ".join(mem))
    return head + "  \n" + " · ".join(parts)


def summary_line(t: dict | None, b: dict | None, base: str, weights: dict) -> str:
    """The one-line verdict after both engines answered."""
    if not t:
        return ""
    if not b or base == NO_BASELINE:
        why = "no baseline selected" if base == NO_BASELINE else f"the {base} baseline did not run"
        return (f"Ternary engine: {t['decode_tokens_per_s']:.1f} tok/s decode, "
                f"TTFT {_fmt_s(t['ttft_s'])} ({why}).")
    td, bd = t["decode_tokens_per_s"], b["decode_tokens_per_s"]
    speed = f"{td / bd:.2f}x" if bd > 0 and td > 0 else "n/a"
    line = (f"**Speed-up: ternary decodes {speed} as fast as {base}** ({td:.1f} vs {bd:.1f} tok/s; "
            f"prefill {t['prefill_tokens_per_s']:.0f} vs {b['prefill_tokens_per_s']:.0f} tok/s; "
            f"TTFT {_fmt_s(t['ttft_s'])} vs {_fmt_s(b['ttft_s'])})")
    wt, wb = weights.get("ternary"), weights.get(base)
    if wt and wb:
        line += f" · **memory: {wt / wb:.2f}x** the {base} weights ({_fmt_mb(wt)} vs {_fmt_mb(wb)})"
    return line + "."


def _downsample(points: list, limit: int = MAX_TIMELINE_POINTS) -> list:
    if len(points) <= limit:
        return points
    step = len(points) / limit
    picked = [points[int(i * step)] for i in range(limit)]
    return picked[:-1] + [points[-1]]


def chart_frames(results: dict):
    """(decode tok/s per engine, tokens over time) as pandas DataFrames for the native plots."""
    import pandas as pd

    speed = pd.DataFrame(
        [{"engine": SHORT.get(v, v), "decode tok/s": round(r["stats"]["decode_tokens_per_s"], 2)}
         for v, r in results.items() if r.get("stats")],
        columns=["engine", "decode tok/s"])
    rows = []
    for v, r in results.items():
        for t, n in _downsample(r.get("timeline", [])):
            rows.append({"seconds": round(t, 4), "tokens": n, "engine": SHORT.get(v, v)})
    timeline = pd.DataFrame(rows, columns=["seconds", "tokens", "engine"])
    return speed, timeline


# -- the service -----------------------------------------------------------------------------------

@dataclasses.dataclass
class ChatSettings:
    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 42  # the same seed on both engines: the same tokens when their logits agree; -1 = random

    def to_runtime(self):
        from runtime import GenerationSettings

        seed = None if self.seed is None or int(self.seed) < 0 else int(self.seed)
        return GenerationSettings(
            max_new_tokens=max(1, int(self.max_new_tokens)), temperature=max(0.0, float(self.temperature)),
            top_k=max(0, int(self.top_k)), top_p=min(1.0, max(1e-3, float(self.top_p))),
            repetition_penalty=max(1e-3, float(self.repetition_penalty)), seed=seed, truncate=True)


class Playground:
    """Model preparation (in a background thread, so the page can show progress) and chats."""

    def __init__(self, model: str | None = DEFAULT_MODEL, threads: int | None = None,
                 variants=None, resolver=resolve_model, time_limit_s: float = TIME_LIMIT_S):
        self.model_spec = model or DEFAULT_MODEL
        self.threads = threads or available_cpus()
        self.variants_requested = variants
        self.resolver = resolver
        self.time_limit_s = time_limit_s
        # A server.Gate shared with the OpenAI-compatible API (set by app.py): each engine run
        # holds one slot, so page and API never generate on the CPU at the same time.
        self.gate = None
        self.gate_timeout_s = 120.0
        self.state = "starting"  # starting | preparing | ready | failed
        self.error = ""
        self.resolved: ResolvedModel | None = None
        self.log_lines: deque[str] = deque(maxlen=200)
        self.engines: dict = {}
        self._engine_lock = threading.Lock()
        self._ready = threading.Event()
        self._cancels: dict[str, threading.Event] = {}
        self._active = 0
        self._active_lock = threading.Lock()
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
            import custom_ops

            self.progress("checking the custom-op library (built on first start)")
            started = time.time()
            path = custom_ops.library_path()
            self.progress(f"custom-op library ready: {path} ({time.time() - started:.1f} s)")
            self.resolved = self.resolver(self.model_spec, variants=self.variants_requested,
                                          progress=self.progress)
            self.progress(f"loading the ternary engine from {self.resolved.folder}")
            started = time.time()
            self.engine("ternary")
            self.progress(f"ternary engine loaded and warmed up in {time.time() - started:.1f} s")
            default = self.default_baseline()
            if default != NO_BASELINE:
                self.progress(f"loading the {default} baseline engine")
                started = time.time()
                self.engine(default)
                self.progress(f"{default} engine loaded and warmed up in {time.time() - started:.1f} s")
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
        eng = self.engines.get("ternary")
        return eng.config if eng is not None else {}

    def variants_available(self) -> list[str]:
        return list(self.config.get("variants", {}))

    def baselines(self) -> list[str]:
        have = self.variants_available()
        return [v for v in BASELINES if v in have] + [NO_BASELINE]

    def default_baseline(self) -> str:
        return self.baselines()[0]

    def engine(self, variant: str):
        """The engine of `variant`, loaded on first use. Besides the ternary engine at most one
        baseline stays loaded (an fp32 2B model is ~10 GB)."""
        with self._engine_lock:
            eng = self.engines.get(variant)
            if eng is not None:
                return eng
            from runtime import Engine

            if variant != "ternary":
                for other in [v for v in self.engines if v != "ternary"]:
                    del self.engines[other]
            folder = self.resolved.folder if self.resolved else None
            eng = Engine(folder, variant=variant, threads=self.threads)
            self._warm_up(eng)
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

    def weights_mb(self, variant: str) -> float | None:
        eng = self.engines.get(variant)
        if eng is not None and getattr(eng, "model_file_bytes", None):
            return eng.model_file_bytes / 2**20
        import os

        if not self.resolved:
            return None
        name = self.config.get("variants", {}).get(variant)
        if not name:
            return None
        path = os.path.join(self.resolved.folder, name)
        size = sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))
        return size / 2**20 if size else None

    def api_models(self):
        """For the OpenAI-compatible API (server.create_api takes a callable): {model id: the
        ternary engine} once ready, None while the model is being prepared."""
        if self.state != "ready" or "ternary" not in self.engines:
            return None
        return {self.resolved.model_id: self.engines["ternary"]}

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
        threads = self.engines["ternary"].threads if "ternary" in self.engines else "?"
        lines = [f"**Live model: {r.name}** · variants {', '.join(self.variants_available())} · "
                 f"context {cfg.get('context_length', '?')} tokens · {threads} "
                 f"thread{'' if threads == 1 else 's'} per engine, one engine at a time"]
        if r.notice:
            lines.append(f"⚠️ {r.notice}")
        if r.untrained:
            lines.append("⚠️ **This is an untrained stand-in with random weights: its answers are "
                         "noise.** The speeds are measured for real.")
        if int(cfg.get("hidden_size") or 0) and int(cfg.get("hidden_size")) < 1024:
            lines.append("At this model size the timings mostly show per-token overheads; the "
                         "ternary kernels pay off on large models such as 2B4T.")
        return "\n\n".join(lines)

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
            "untrained": bool(r and r.untrained),
            "notice": r.notice if r else "",
            "variants": self.variants_available(),
            "baselines": self.baselines() if self.state == "ready" else [],
            "loaded_engines": list(self.engines),
            "context_length": self.config.get("context_length"),
            "active_generations": self._active,
            "engine_active_generations": {v: e.active_generations for v, e in list(self.engines.items())},
            "log": list(self.log_lines)[-20:],
        }

    # -- stop --------------------------------------------------------------------------------------
    def _new_cancel(self, session: str) -> threading.Event:
        ev = threading.Event()
        self._cancels[session] = ev
        return ev

    def stop(self, session: str) -> bool:
        ev = self._cancels.get(session)
        if ev is None:
            return False
        ev.set()
        return True

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

    def compare(self, message: str, hist_t, hist_b, system: str, baseline: str,
                settings: ChatSettings, session: str = "default"):
        """Generator of page states (dicts) for one user message: the ternary engine answers,
        then the baseline. Each state: chat_t, chat_b, stats_t, stats_b, summary, results."""
        if self.state != "ready":
            raise NotReady(self.banner_markdown() if self.state == "failed"
                           else "The model is still being prepared; try again in a moment.")
        message = message.replace("\r\n", "\n")
        system = system or ""
        engine_t = self.engine("ternary")
        self.check_message(engine_t, system, message)
        if baseline not in self.baselines():
            baseline = self.default_baseline()
        run_base = baseline != NO_BASELINE
        gen_settings = settings.to_runtime()
        cancel = self._new_cancel(session)

        hist_t = list(hist_t or [])
        hist_b = list(hist_b or [])
        msgs_t = history_to_messages(hist_t)
        # The baseline continues its own pane; if that pane missed turns (baseline was off),
        # it continues the ternary conversation instead.
        msgs_b = history_to_messages(hist_b)
        if user_turns(hist_b) != user_turns(hist_t):
            msgs_b = msgs_t
            hist_b = [dict(m) for m in hist_t]
        sys_msgs = [{"role": "system", "content": system}] if system.strip() else []
        user_shown = {"role": "user", "content": shown(message)}

        chat_t = hist_t + [user_shown, {"role": "assistant", "content": ""}]
        chat_b = hist_b + [user_shown, {"role": "assistant", "content": WAITING}] if run_base else hist_b
        results: dict = {"ternary": {}}
        if run_base:
            results[baseline] = {}
        stats_md = {"ternary": stats_markdown("ternary", None, "starting", self.weights_mb("ternary")),
                    baseline: stats_markdown(baseline, None, "waiting for the ternary engine",
                                             self.weights_mb(baseline)) if run_base else ""}

        def state(summary="", final=False):
            return {"final": final, "chat_t": chat_t, "chat_b": chat_b, "stats_t": stats_md["ternary"],
                    "stats_b": stats_md.get(baseline, ""), "summary": summary, "results": results,
                    "baseline": baseline}

        with self._active_lock:
            self._active += 1
        try:
            yield state("Ternary engine answering…")
            order = ["ternary"] + ([baseline] if run_base else [])
            for variant in order:
                chat = chat_t if variant == "ternary" else chat_b
                msgs = msgs_t if variant == "ternary" else msgs_b
                if cancel.is_set():
                    chat[-1] = {"role": "assistant", "content": "*(stopped before it started)*"}
                    stats_md[variant] = stats_markdown(variant, None, "stopped", self.weights_mb(variant))
                    results[variant] = {"text": "", "finish_reason": "cancelled", "stats": None, "timeline": []}
                    continue
                if variant not in self.engines:
                    stats_md[variant] = stats_markdown(variant, None, f"loading the {variant} engine…", None)
                    yield state()
                engine = self.engine(variant)
                if self.gate is not None and not self.gate.idle():
                    stats_md[variant] = stats_markdown(variant, None, "waiting for the CPU (API "
                                                       "requests ahead)…", self.weights_mb(variant))
                    yield state()
                with self._cpu_slot(cancel) as may_run:
                    if may_run:
                        yield from self._run_engine(variant, engine, chat, sys_msgs + msgs, message,
                                                    gen_settings, cancel, results, stats_md, state)
                    else:  # stopped while waiting for the CPU
                        chat[-1] = {"role": "assistant", "content": "*(stopped before it started)*"}
                        stats_md[variant] = stats_markdown(variant, None, "stopped", self.weights_mb(variant))
                        results[variant] = {"text": "", "finish_reason": "cancelled", "stats": None,
                                            "timeline": []}
            t = results["ternary"].get("stats")
            b = results.get(baseline, {}).get("stats") if run_base else None
            summary = summary_line(t, b, baseline if run_base else NO_BASELINE,
                                   {v: self.weights_mb(v) for v in results})
            if cancel.is_set():
                summary = "Stopped. " + summary
            cut = [SHORT.get(v, v) for v, r in results.items() if r.get("time_limit")]
            if cut:
                summary += (f" ({' and '.join(cut)} cut at the {self.time_limit_s:.0f} s time limit: "
                            "its rates cover the tokens it wrote.)")
            yield state(summary, final=True)
        finally:
            with self._active_lock:
                self._active -= 1
            if self._cancels.get(session) is cancel:
                del self._cancels[session]

    @contextlib.contextmanager
    def _cpu_slot(self, cancel: threading.Event):
        """Hold a slot of the gate shared with the HTTP API for one engine run (no-op without).
        Stop while waiting gives up the place at once (yields False: do not run)."""
        if self.gate is None:
            yield True
            return
        try:
            ticket = self.gate.admit()
        except Exception as e:  # noqa: BLE001 - server.Busy: the wait queue is full
            raise CpuBusy(f"The server is busy ({e}); try again in a moment.") from None
        try:
            if not ticket.wait(self.gate_timeout_s, abandon=cancel):
                if cancel.is_set():
                    yield False
                    return
                raise CpuBusy(f"Waited {self.gate_timeout_s:.0f} s for the CPU (API requests "
                              "ahead); try again in a moment.")
            yield True
        finally:
            ticket.release()

    def _run_engine(self, variant, engine, chat, history, message, gen_settings, cancel, results,
                    stats_md, state):
        """One engine's answer to `message`, streamed into chat[-1]; yields page states."""
        # the timeline starts at (0 s, 0 tokens): the flat start is the time to first token
        res = results[variant] = {"text": "", "finish_reason": None, "stats": None,
                                  "timeline": [(0.0, 0)]}
        text = ""
        chat[-1] = {"role": "assistant", "content": ""}
        stats_md[variant] = stats_markdown(variant, None, "prefill…", self.weights_mb(variant))
        yield state(f"{SHORT[variant]} engine answering…")
        started = time.perf_counter()
        last_yield = 0.0
        run_cancel = _EitherSet(cancel)
        stream = engine.stream(messages=history + [{"role": "user", "content": message}],
                               settings=gen_settings, cancel=run_cancel)
        try:
            for event in stream:
                text += event.text
                if time.perf_counter() - started > self.time_limit_s:
                    run_cancel.timed_out = True  # the engine stops after this token
                st = event.stats.as_dict()
                res["stats"] = st
                res["timeline"].append((time.perf_counter() - started, st["new_tokens"]))
                now = time.perf_counter()
                if event.done or now - last_yield >= UPDATE_EVERY_S:
                    last_yield = now
                    chat[-1] = {"role": "assistant", "content": shown(text)}
                    label = "streaming…"
                    if event.done:
                        label = {"stop": "done", "length": "done (max new tokens)",
                                 "cancelled": "stopped"}.get(event.finish_reason, "done")
                        if event.finish_reason == "cancelled" and run_cancel.timed_out \
                                and not cancel.is_set():
                            label = f"cut at the {self.time_limit_s:.0f} s time limit"
                            res["time_limit"] = True
                        res["finish_reason"] = event.finish_reason
                        res["text"] = text
                    stats_md[variant] = stats_markdown(variant, st, label, self.weights_mb(variant))
                    yield state(f"{SHORT[variant]} engine answering…" if not event.done else "")
        finally:
            if res["finish_reason"] is None:  # closed mid-run (request cancelled)
                cancel.set()
            stream.close()
        if not text:
            chat[-1] = {"role": "assistant", "content": "*(no text: the model ended its turn at once)*"
                        if res["finish_reason"] == "stop" else "*(stopped)*"}
