"""The answers of the two completion routes, from a job's results (server/work.py): a JSON
body once the job ends, or server-sent events as it goes (with keep-alive comments while the
request waits for the CPU or a token).

    body = await collect(job, kind, meta, request)        # kind: CHAT or TEXT
    return JobStream(stream(admitted_or_job, ...), ...)    # SSE
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from .errors import ApiError
from .logprob_format import TokenText, chat_logprobs, completion_logprobs
from .work import PromptScores

CHAT, TEXT = "chat", "text"
FINISH = {"stop": "stop", "length": "length", "time": "length", "cancelled": "length"}
KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see bytes


@dataclass
class Meta:
    """What every body and chunk of one request carries, and how its results are shaped."""
    id: str
    created: int
    model: str
    max_tokens: int
    t0: float  # time.monotonic() at arrival
    kind: str  # CHAT or TEXT
    names: TokenText
    stop_ids: set
    head: str  # the lm_head that computed the logits (logprobs' fidelity)
    echo: bool = False
    want_logprobs: bool = False
    prompt_texts: list = field(default_factory=list)  # TEXT + echo: each prompt's text
    n: int = 1
    metrics: object = None  # server.metrics.ApiMetrics or None


class Choice:
    """One choice's results as they arrive."""

    def __init__(self, index: int):
        self.index = index
        self.parts: list[str] = []
        self.logprobs: list = []
        self.last = None  # the last GenerationEvent
        self.prompt: PromptScores | None = None
        self.timer = None
        self.context: list[int] = []

    def add(self, event, meta: Meta) -> list:
        """Take an event; the logprobs of its tokens that the answer shows (a stop token's is not)."""
        self.context = [lp.token for lp in self.logprobs]  # the shown tokens before this event's
        self.parts.append(event.text)
        self.last = event
        shown = list(event.logprobs or [])
        if event.done and event.finish_reason == "stop" and shown and shown[-1].token in meta.stop_ids:
            shown.pop()
        self.logprobs += shown
        return shown

    @property
    def finish_reason(self) -> str:
        return FINISH.get(self.last.finish_reason if self.last else None, "stop")


def _extras(choice: Choice, record, meta: Meta) -> dict:
    stats = choice.last.stats.as_dict() if choice.last is not None else {}
    stats.update(queue_wait_s=round(record.queued_s, 6), max_tokens=meta.max_tokens,
                 engine_finish_reason=record.finish_reason, stopped_by=record.stopped_by,
                 latency_s=round(time.monotonic() - meta.t0, 6))
    if meta.want_logprobs:
        stats["logprobs_head"] = meta.head
    return stats


class Results:
    """A job's results sorted into choices and prompt scores, with the metrics' timers."""

    def __init__(self, meta: Meta, count: int):
        self.meta = meta
        self.choices = {i: Choice(i) for i in range(count)}
        for c in self.choices.values():
            if meta.metrics is not None:
                c.timer = meta.metrics.request_timer(meta.t0)
        self.prompts: dict[int, PromptScores] = {}

    def take(self, item):
        """Sort one result in: (choice, logprobs shown) for an event, (None, None) for scores."""
        if isinstance(item, PromptScores):
            for j in range(self.meta.n):
                self.prompts[item.index + j] = item
            return None, None
        choice = self.choices[item.index]
        shown = choice.add(item.event, self.meta)
        if choice.timer is not None:
            choice.timer.tokens(len(item.event.token_ids))
        return choice, shown

    def usage(self) -> dict:
        """Prompt tokens once per prompt, completion tokens of every choice."""
        n = self.meta.n
        p = 0
        for first in range(0, len(self.choices), n):
            if first in self.prompts:
                p += len(self.prompts[first].ids)
            elif self.choices[first].last is not None:
                p += self.choices[first].last.stats.prompt_tokens
        c = sum(ch.last.stats.new_tokens for ch in self.choices.values() if ch.last is not None)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def finish(self) -> dict:
        """The usage, counted into the metrics (once)."""
        usage = self.usage()
        if self.meta.metrics is not None:
            timer = self.meta.metrics.request_timer(self.meta.t0)
            timer.finish(usage["prompt_tokens"], usage["completion_tokens"])
        return usage

    def text_logprobs(self, choice: Choice) -> dict | None:
        if not self.meta.want_logprobs:
            return None
        scores = self.prompts.get(choice.index)
        echo = self.meta.echo and scores is not None
        return completion_logprobs(self.meta.names, scores.ids if echo else None,
                                   scores.scores if echo else None, choice.logprobs)


def body(results: Results, record) -> dict:
    """The whole answer (stream: false)."""
    meta = results.meta
    usage = results.finish()
    first = results.choices[0]
    if meta.kind == CHAT:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.parts)},
                    "finish_reason": c.finish_reason,
                    "logprobs": chat_logprobs(meta.names, c.logprobs) if meta.want_logprobs else None}
                   for c in results.choices.values()]
        obj = "chat.completion"
    else:
        choices = [{"index": c.index, "text": _echo(meta, c) + "".join(c.parts), "finish_reason": c.finish_reason,
                    "logprobs": results.text_logprobs(c)} for c in results.choices.values()]
        obj = "text_completion"
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model,
            "system_fingerprint": None, "choices": choices, "usage": usage,
            "bitnet": _extras(first, record, meta)}


def _echo(meta: Meta, choice: Choice) -> str:
    return meta.prompt_texts[choice.index // meta.n] if meta.echo else ""


def _generation_failed(error: Exception) -> ApiError:
    """The engine's failure as the API reports it (500), in a body or a stream."""
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", "server_error",
                    code="generation_failed")


async def collect(job, results: Results, request) -> dict:
    """Run the job to its end (stopping it if the client goes away) and answer with one body."""
    async def consume():
        async for item in job.events():
            results.take(item)

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
        raise _generation_failed(e) from None
    finally:
        if not task.done():
            task.cancel()
    return body(results, job.record)


# -- server-sent events -----------------------------------------------------------------------
def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chunk(meta: Meta, choices: list, **extra) -> str:
    obj = {"id": meta.id, "object": "chat.completion.chunk" if meta.kind == CHAT else "text_completion",
           "created": meta.created, "model": meta.model, "system_fingerprint": None, "choices": choices}
    obj.update(extra)
    return _data(obj)


def _chat_choice(index: int, delta: dict, finish=None, logprobs=None) -> dict:
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}


def _text_choice(index: int, text: str, finish=None, logprobs=None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


async def _next_or_keepalive(aiter, pending: dict, interval: float):
    """The next item of `aiter`, or KEEPALIVE when none came within `interval` seconds (the
    pending __anext__ task is kept, never cancelled, so nothing is lost). StopAsyncIteration
    at the end."""
    if "task" not in pending:
        pending["task"] = asyncio.ensure_future(aiter.__anext__())
    done, _ = await asyncio.wait({pending["task"]}, timeout=interval)
    if not done:
        return KEEPALIVE
    task = pending.pop("task")
    return task.result()


def _item_chunks(meta: Meta, item, choice, shown) -> list[str]:
    """The SSE chunks of one result of the job: a choice's new text (and logprobs), or, for a
    completion with echo, its prompt's scores (`choice` None)."""
    if choice is None:  # prompt scores: the echoed prompt (completions)
        if not (meta.kind == TEXT and meta.echo):
            return []
        # the prompt's logprobs, the same for each of its n choices: shaped once
        lp = completion_logprobs(meta.names, item.ids, item.scores, []) if meta.want_logprobs else None
        return [_chunk(meta, [_text_choice(index, meta.prompt_texts[index // meta.n], None, lp)])
                for index in range(item.index, item.index + meta.n)]
    event = item.event
    if not (event.text or shown):
        return []
    if meta.kind == CHAT:
        lp = chat_logprobs(meta.names, shown, choice.context) if meta.want_logprobs else None
        delta = {"content": event.text} if event.text else {}
        return [_chunk(meta, [_chat_choice(choice.index, delta, None, lp)])]
    lp = completion_logprobs(meta.names, None, None, shown, context=choice.context) if meta.want_logprobs else None
    return [_chunk(meta, [_text_choice(choice.index, event.text, None, lp)])]


def _final_chunks(meta: Meta, results: Results, record, include_usage: bool) -> list[str]:
    """The closing SSE chunks: each choice's finish reason with its own stats, the usage, [DONE]."""
    usage = results.finish()
    finals = list(results.choices.values())
    chunks = []
    for k, c in enumerate(finals):
        extra = {"bitnet": _extras(c, record, meta)}
        if not include_usage and k == len(finals) - 1:
            extra["usage"] = usage
        chunks.append(_chunk(meta, [_chat_choice(c.index, {}, c.finish_reason) if meta.kind == CHAT
                                    else _text_choice(c.index, "", c.finish_reason)], **extra))
    if include_usage:  # OpenAI's usage chunk: no choices
        chunks.append(_chunk(meta, [], usage=usage))
    return chunks + ["data: [DONE]\n\n"]


async def stream(start, meta: Meta, results: Results, include_usage: bool, keepalive_s: float, on_job):
    """The SSE body. `start`: an awaitable giving the started Job (the wait for the CPU
    happens here, with keep-alive comments, so a proxy or a client with a short read timeout
    keeps the connection); `on_job(job)` hands the job to the response (to stop it when the
    client leaves)."""
    task = asyncio.ensure_future(start)
    job = None
    try:
        while True:  # waiting for the CPU
            done, _ = await asyncio.wait({task}, timeout=keepalive_s)
            if done:
                break
            yield KEEPALIVE
        try:
            job = task.result()
        except Exception as e:
            from .openai_api import api_error

            yield _data(api_error(e).body())
            yield "data: [DONE]\n\n"
            return
        on_job(job)
        for i in range(len(results.choices)):
            if meta.kind == CHAT:
                yield _chunk(meta, [_chat_choice(i, {"role": "assistant", "content": ""})])
            elif meta.echo and not meta.want_logprobs:  # the echoed prompt (with logprobs: with its scores)
                yield _chunk(meta, [_text_choice(i, meta.prompt_texts[i // meta.n])])
        pending: dict = {}
        events = job.events()
        try:
            while True:
                try:
                    item = await _next_or_keepalive(events, pending, keepalive_s)
                except StopAsyncIteration:
                    break
                if item is KEEPALIVE:
                    yield KEEPALIVE
                    continue
                for chunk in _item_chunks(meta, item, *results.take(item)):
                    yield chunk
        except Exception as e:
            yield _data(_generation_failed(e).body())
            yield "data: [DONE]\n\n"
            return
        for chunk in _final_chunks(meta, results, job.record, include_usage):
            yield chunk
    finally:
        if not task.done():
            task.cancel()
        if job is not None and not job.finished.is_set():
            job.stop("client")
