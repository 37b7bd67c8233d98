"""One compare-mode turn: the ternary engine answers, then the baseline answers the same
prompt (the same history, token for token, the same seed), one after the other, so the turn
never times the two engines against each other on shared cores. The answers are written into
the conversation (playground/conversation.py) as they stream; the page renders it."""

from __future__ import annotations

import time

from .conversation import TERNARY, model_messages, new_turn, turns_of
from .gates import run_holding

UPDATE_EVERY_S = 0.1  # at most ~10 page updates per second while streaming
TIMELINE_POINTS_KEPT = 480  # per answer (the chart shows at most half of them)


class NotReady(RuntimeError):
    pass


class TooLong(ValueError):
    pass


def check_message(engine, system: str, message: str) -> None:
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


def run_turn(pg, message: str, conversation, system: str, baseline: str, settings, session: str):
    """Generator of (turns, final) page states for one visitor message; `pg` is the
    Playground (its engines, gates and cancel registry)."""
    if pg.state != "ready":
        raise NotReady(pg.banner_markdown() if pg.state == "failed"
                       else "The model is still being prepared; try again in a moment.")
    message = message.replace("\r\n", "\n")
    system = system or ""
    engine_t = pg.engine(TERNARY if pg.ternary_ok else pg.default_baseline())
    check_message(engine_t, system, message)
    if baseline not in pg.baselines():
        baseline = pg.default_baseline()
    turns = [dict(t) for t in turns_of(conversation)]
    history = model_messages(turns, system)
    turn = new_turn(message, baseline, settings.turn_seed(), pg.context_length,
                    dict(vars(settings), system=system))
    if not pg.ternary_ok:
        turn["answers"][TERNARY].update(state="skipped", finish_reason="unavailable")
    turns.append(turn)
    gen_settings = settings.to_runtime(turn["seed"], pg.time_limit_s)
    prompt = history + [{"role": "user", "content": message}]
    with pg.cancels.turn(session) as cancel:
        try:
            yield turns, False
            for variant, answer in turn["answers"].items():
                if answer["state"] == "skipped":
                    continue
                if cancel.is_set():
                    answer.update(state="stopped", finish_reason="cancelled")
                    continue
                if variant not in pg.engines:
                    answer["state"] = "loading"
                    yield turns, False
                engine = pg.engine(variant)
                answer["weights_mb"] = engine.model_file_bytes / 2**20

                def stream(engine=engine, answer=answer):
                    return stream_answer(engine, answer, prompt, gen_settings, cancel, turns)

                def in_shared_slot(stream=stream, answer=answer):
                    return run_holding(pg.gate, pg.gate_timeout_s, answer, cancel, turns, stream)

                if pg.batch and engine is not pg.engines.get(TERNARY):
                    # a baseline first waits for the baselines' own one-slot gate
                    yield from run_holding(pg.baseline_gate, pg.gate_timeout_s, answer, cancel,
                                           turns, in_shared_slot)
                else:
                    yield from in_shared_slot()
            yield turns, True
        finally:
            for a in turn["answers"].values():  # closed mid-run: nothing is left "streaming"
                if a["state"] not in ("done", "stopped", "skipped"):
                    a.update(state="stopped", finish_reason=a["finish_reason"] or "cancelled")


def stream_answer(engine, answer: dict, prompt, gen_settings, cancel, turns):
    """One engine's answer, streamed into `answer`; yields page states."""
    answer.update(state="prefill", text="", timeline=[(0.0, 0)])  # flat start = TTFT
    yield turns, False
    started, cpu_started = time.perf_counter(), time.process_time()
    last_yield = 0.0
    stream = engine.stream(messages=prompt, settings=gen_settings, cancel=cancel)
    try:
        for event in stream:
            answer["text"] += event.text
            answer["stats"] = with_cost(event.stats.as_dict(), time.process_time() - cpu_started,
                                        answer.get("weights_mb"))
            now = time.perf_counter()
            timeline = answer["timeline"]
            timeline.append((now - started, answer["stats"]["new_tokens"]))
            if len(timeline) > TIMELINE_POINTS_KEPT:
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


def with_cost(stats: dict, cpu_s: float, weights_mb: float | None) -> dict:
    """`stats` with the answer's cost per generated token: the process CPU time while it ran
    (shared equally among the streams of the batch it ran in) and the weight bytes read (each
    decode step streams every weight once, for the whole batch). CPU time, not energy."""
    batch = max(1.0, float(stats.get("batch_size") or 1.0))
    n = stats.get("new_tokens") or 0
    stats["cpu_s"] = cpu_s / batch
    stats["cpu_ms_per_token"] = stats["cpu_s"] * 1000 / n if n else None
    stats["weights_mb_per_token"] = weights_mb / batch if weights_mb and n else None
    return stats
