"""One generation's per-token work, the same whoever runs the model: the Engine (one sequence
in its own cache) or the Batcher (many sharing a decode step) feeds a Generation the logits,
and it samples the token, applies the stop rules, the length limit, the caller's cancel and
time limit, decodes the streamed text and snapshots the stats into each GenerationEvent.

    gen = Generation(engine, ids, settings, max_new=..., cancel=..., started=..., stats=...)
    event = gen.first(prefill_logits)          # then, until event.done:
    event = gen.next(decode_step(gen.token))   # or gen.end(gen.interrupted()) between tokens
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from .logprobs import TokenLogprob, token_logprob
from .sampling import GenerationSettings, Sampler
from .stats import GenerationStats, peak_rss_mb, rss_mb
from .text import StreamDecoder


@dataclass
class GenerationEvent:
    text: str  # new text since the previous event (never a split character)
    token_ids: list[int]  # new token ids since the previous event
    stats: GenerationStats
    done: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "time" | "cancelled" once done
    # settings.logprobs set: one TokenLogprob per id of token_ids (runtime/logprobs.py)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None

    @classmethod
    def collect(cls, events) -> "GenerationResult":
        """The whole generation from a stream of GenerationEvents (Engine's or the batcher's)."""
        parts, ids, logprobs, last = [], [], [], None
        for event in events:
            parts.append(event.text)
            ids.extend(event.token_ids)
            logprobs.extend(event.logprobs or [])
            last = event
        return cls("".join(parts), ids, last.stats, last.finish_reason,
                   logprobs if last.logprobs is not None or logprobs else None)


def checked_settings(settings: GenerationSettings | None) -> GenerationSettings:
    """A validated copy (the caller's object is never changed); None: the defaults."""
    settings = dataclasses.replace(settings) if settings is not None else GenerationSettings()
    settings.stop = [settings.stop] if isinstance(settings.stop, str) else list(settings.stop)
    settings.validate()
    return settings


def checked_token_ids(ids, vocab_size: int) -> list[int]:
    """Prompt token ids as ints; ValueError when there are none or one is outside the vocabulary."""
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("no prompt tokens")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size})")
    return ids


class EarlyStop:
    """The reasons to end a generation before its stop rules do, checked between tokens (and
    between prefill chunks): the caller's `cancel` (anything with is_set(), e.g. a
    threading.Event), `closed` (the consumer went away) and the deadline of settings.max_time_s."""

    def __init__(self, cancel, max_time_s: float | None, started: float):
        self.cancel = cancel
        self.closed = False
        self.deadline = None if max_time_s is None else started + float(max_time_s)

    def reason(self) -> str | None:
        if self.closed or (self.cancel is not None and self.cancel.is_set()):
            return "cancelled"
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return "time"
        return None


class Generation:
    """One sequence's state between model runs: sampler, stop rules, text, stats.

    engine: gives the tokenizer, vocab_size, stop_token_ids, variant and threads.
    max_new: the most tokens to generate (settings.max_new_tokens capped by the cache).
    started: time.perf_counter() when the request came (ttft and max_time_s count from it).
    stats: a GenerationStats (or subclass) with the cache fields set; filled as it goes.
    Each event method takes `memory` = (rss_mb, peak_rss_mb) when the caller sampled it
    already (the batcher, once per step); None samples it now.
    """

    def __init__(self, engine, ids: list[int], settings: GenerationSettings, *, max_new: int,
                 cancel, started: float, stats: GenerationStats):
        self.ids, self.settings, self.max_new, self.started = ids, settings, max_new, started
        self.early_stop = EarlyStop(cancel, settings.max_time_s, started)
        stop_ids = engine.stop_token_ids if settings.stop_token_ids is None else settings.stop_token_ids
        self.stop_ids = set(stop_ids)
        self.decoder = StreamDecoder(engine.tokenizer, settings.stop)
        self.sampler = Sampler(settings, engine.vocab_size, ids)
        self.stats = stats
        stats.prompt_tokens, stats.variant, stats.threads = len(ids), engine.variant, engine.threads
        self.t_prefill = time.perf_counter()  # the batcher resets it when the prompt gets a slot
        self.t_first: float | None = None
        self.token: int | None = None  # the last token sampled (the next one to feed the model)
        self.count = 0  # tokens sampled
        self.done = False

    def interrupted(self) -> str | None:
        """"cancelled" or "time" when the generation must end now, else None."""
        return self.early_stop.reason()

    def first(self, logits, memory=None) -> GenerationEvent:
        """The prompt is in the cache (`logits`: its last position's): the first token's event."""
        s = self.stats
        s.prefill_s = time.perf_counter() - self.t_prefill
        s.prefill_tokens_per_s = len(self.ids) / max(s.prefill_s, 1e-9)
        token = self.sampler(logits)
        self.t_first = time.perf_counter()
        s.ttft_s = self.t_first - self.started
        return self._accept(token, memory, logits)

    def next(self, logits, memory=None) -> GenerationEvent:
        """The event of the token sampled from a decode step's `logits`."""
        return self._accept(self.sampler(logits), memory, logits)

    def end(self, reason: str, memory=None) -> GenerationEvent:
        """The last event, ended between tokens by `reason`: the text still held back."""
        return self._event(self.decoder.flush(), [], reason, memory)

    def _accept(self, token: int, memory, logits) -> GenerationEvent:
        self.token = token
        k = self.settings.logprobs
        logprobs = None if k is None else [token_logprob(logits, token, k)]
        self.count += 1
        if token in self.stop_ids:
            text, reason = "", "stop"
        else:
            text = self.decoder.add([token])
            reason = "stop" if self.decoder.stopped else "length" if self.count >= self.max_new else None
        reason = reason or self.interrupted()
        if reason is not None and reason != "stop":
            text += self.decoder.flush()
        return self._event(text, [token], reason, memory, logprobs)

    def _event(self, text: str, token_ids: list[int], reason: str | None, memory,
               logprobs: list[TokenLogprob] | None = None) -> GenerationEvent:
        s, now = self.stats, time.perf_counter()
        s.new_tokens += len(token_ids)
        s.total_s = now - self.started
        if s.new_tokens > 1:
            s.decode_s = now - self.t_first
            s.decode_tokens_per_s = (s.new_tokens - 1) / max(s.decode_s, 1e-9)
        rss, peak = memory if memory is not None else (rss_mb(), peak_rss_mb())
        s.rss_mb, s.peak_rss_mb = rss, max(peak, rss)
        self.done = reason is not None
        if logprobs is None and self.settings.logprobs is not None:
            logprobs = []
        return GenerationEvent(text=text, token_ids=token_ids, stats=dataclasses.replace(s),
                               done=self.done, finish_reason=reason, logprobs=logprobs)
