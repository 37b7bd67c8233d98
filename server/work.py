"""What one API request runs on an engine, in its job's worker thread: one or more prompts,
n choices each, optionally scored first (echo with logprobs, max_tokens 0).

    plan = Plan(prompts=[[ids...]], settings=settings, n=2, score_top=None)
    run_plan(engine, plan, cancel, emit)   # emit(ChoiceEvent | PromptScores), in order per choice

Choice i * n + j is choice j of prompt i (OpenAI's order). Through a batched engine all the
choices decode side by side (n > 1 shares its prompt's prefill: Batcher.submit_many); a plain
engine runs them one after another (the API refuses n > 1 there).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class Plan:
    prompts: list[list[int]]  # token ids, one list per prompt
    settings: object  # runtime.GenerationSettings; max_new_tokens 0: score only, generate nothing
    n: int = 1
    score_top: int | None = None  # None: no prompt scores; k: score each prompt with top-k alternatives
    messages: list | None = None  # a chat's messages (prompts[0] is their templated ids): one
    # choice runs as engine.stream(messages=...), the engine's own entry for a chat

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class ChoiceEvent:
    index: int
    event: object  # runtime.GenerationEvent


@dataclass
class PromptScores:
    index: int  # the first choice of the prompt (every choice of a prompt shares its scores)
    ids: list[int]
    scores: list = field(default_factory=list)  # runtime.logprobs.TokenLogprob per token after the first


def run_plan(engine, plan: Plan, cancel: threading.Event, emit) -> None:
    """Run every prompt and choice of `plan`, handing each result to `emit` as it comes.
    Raises what the engine raises (the job reports it)."""
    if plan.score_top is not None:
        for i, ids in enumerate(plan.prompts):
            scores = engine.score(ids, top=plan.score_top, cancel=cancel)
            if scores is None:  # cancelled
                return
            emit(PromptScores(i * plan.n, ids, scores))
    if plan.settings.max_new_tokens == 0:
        for i, ids in enumerate(plan.prompts):
            for j in range(plan.n):
                emit(ChoiceEvent(i * plan.n + j, _nothing_generated(engine, ids)))
        return
    if plan.messages is not None and plan.n == 1:
        for event in engine.stream(messages=plan.messages, settings=plan.settings, cancel=cancel):
            emit(ChoiceEvent(0, event))
        return
    if engine.batcher is None:  # one sequence at a time
        for i, ids in enumerate(plan.prompts):
            for event in engine.stream_tokens(ids, plan.settings, cancel):
                emit(ChoiceEvent(i * plan.n, event))
        return
    streams = []
    for i, ids in enumerate(plan.prompts):
        group = [engine.stream_tokens(ids, plan.settings, cancel)] if plan.n == 1 else \
            engine.submit_many(plan.n, ids, plan.settings, cancel)
        streams += [(i * plan.n + j, s) for j, s in enumerate(group)]
    _pump(streams, emit)


def _pump(streams, emit) -> None:
    """Hand on the events of streams that run side by side (each blocks on its own queue):
    one small thread per stream; the first error is raised once all have ended."""
    errors: list[BaseException] = []

    def pump(index, stream):
        try:
            for event in stream:
                emit(ChoiceEvent(index, event))
        except BaseException as e:  # the job reports it
            errors.append(e)

    threads = [threading.Thread(target=pump, args=item, name=f"bitnet-choice-{item[0]}", daemon=True)
               for item in streams[1:]]
    for t in threads:
        t.start()
    pump(*streams[0])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _nothing_generated(engine, ids):
    from runtime.generation import GenerationEvent
    from runtime.stats import GenerationStats

    stats = GenerationStats(prompt_tokens=len(ids), variant=engine.variant, threads=engine.threads)
    return GenerationEvent(text="", token_ids=[], stats=stats, done=True, finish_reason="length")
