"""The conversation: one list of turns, the one thing the page keeps.

Both engines see the same history: the user's messages and the ternary engine's answers
(`model_messages`). Each turn also holds the baseline's own answer to that same prompt, so its
pane shows what the baseline really wrote, or a clear "not run". The two chat panes are views
rendered from the turns (`pane_messages`); nothing written there for the visitor (notes, stats
footers, placeholders) ever reaches a model.

A turn is plain JSON (it travels in the page and in shared links):

    {"user": "raw text", "seed": 123, "baseline": "int2" | "none", "context": 4096,
     "settings": {"max_new_tokens": 256, "temperature": 0.6, ..., "seed": -1, "system": "..."},
     "answers": {"ternary": ANSWER, "int2": ANSWER}}
    ANSWER = {"text": str, "state": "waiting" | "prefill" | "streaming" | "done" | "stopped"
              | "skipped", "finish_reason": None | "stop" | "length" | "time" | "cancelled",
              "stats": dict | None, "weights_mb": float | None}
"""

from __future__ import annotations

import json

TERNARY = "ternary"
NO_BASELINE = "none"

WAITING = "*(waiting: the baseline runs after the ternary engine, so the two never share the cores)*"
NOT_RUN_NONE = "*(no baseline for this turn)*"


def new_turn(user: str, baseline: str, seed: int | None, context: int | None,
             settings: dict | None = None) -> dict:
    """A turn about to run. `settings`: the page's settings it ran with (a shared link restores
    them from its last turn)."""
    answers = {TERNARY: new_answer()}
    if baseline != NO_BASELINE:
        answers[baseline] = new_answer()
    return {"user": user, "seed": seed, "baseline": baseline, "context": context,
            "settings": dict(settings or {}), "answers": answers}


def new_answer() -> dict:
    return {"text": "", "state": "waiting", "finish_reason": None, "stats": None, "weights_mb": None}


def dumps(turns) -> str:
    """The conversation as the page holds it: JSON text (a hidden textbox; Gradio saves a text
    value in shared links as it is)."""
    return json.dumps(turns_of(turns), ensure_ascii=False)


def turns_of(conversation) -> list[dict]:
    """The turns of a conversation value from the page: a list or its JSON text (None or
    malformed -> [])."""
    if isinstance(conversation, str):
        try:
            conversation = json.loads(conversation) if conversation.strip() else []
        except ValueError:
            return []
    if not isinstance(conversation, list):
        return []
    return [t for t in conversation if isinstance(t, dict) and isinstance(t.get("user"), str)
            and isinstance(t.get("answers"), dict)]


def downsample(points: list, limit: int) -> list:
    """`points` cut to `limit` evenly spaced ones, the first and the last kept."""
    if len(points) <= limit:
        return points
    step = len(points) / limit
    return [points[int(i * step)] for i in range(limit - 1)] + [points[-1]]


def thinned(turn: dict, points: int) -> dict:
    """The turn with each answer's token timeline cut to about `points` points (the first
    and the last kept): what a link or the browser's storage keeps."""
    answers = {variant: dict(answer, timeline=downsample(answer.get("timeline") or [], points))
               for variant, answer in turn["answers"].items()}
    return dict(turn, answers=answers)


def ran(answer: dict | None) -> bool:
    """Did the engine produce at least one token for this answer?"""
    return bool(answer and answer.get("stats") and answer["stats"].get("new_tokens"))


def model_messages(turns, system: str = "") -> list[dict]:
    """The chat both engines continue: system prompt, then each turn the ternary engine answered
    (user message + its answer as written, a stopped answer as far as it got). A turn the
    ternary engine never answered is left out with its user message. (Where the ternary
    engine cannot run at all, the baseline's answers are the history.)"""
    out = [{"role": "system", "content": system}] if system and system.strip() else []
    for t in turns_of(turns):
        answer = t["answers"].get(TERNARY)
        if answer and answer.get("state") == "skipped":  # no ternary engine on this machine
            answer = t["answers"].get(t.get("baseline"))
        if not ran(answer):
            continue
        out += [{"role": "user", "content": t["user"]},
                {"role": "assistant", "content": answer.get("text") or ""}]
    return out


# -- what the visitor sees ------------------------------------------------------------------------
# Text goes to the chat panes as it was typed or generated: Gradio renders its markdown and
# sanitizes any HTML in it (no script, no event handler runs), and the page's
# Content-Security-Policy keeps images to the page's own origin (playground/ui.py HEAD).

def _finish_note(variant: str, answer: dict) -> str:
    state = answer.get("state")
    if state in ("waiting", "prefill", "streaming"):
        return ""
    if state == "skipped":
        return f"*({variant} engine unavailable on this machine)*"
    if answer.get("finish_reason") == "stop" and ran(answer):
        return "*(no text: the model ended its turn at once)*"
    return f"*({variant} not run: stopped before it started)*" if not ran(answer) \
        else "*(stopped)*"


def _footer(variant: str, answer: dict, seed) -> str:
    """Per-message stats under an answer (kept with each message, not only the last turn)."""
    s = answer.get("stats")
    if not s or answer.get("state") in ("waiting", "prefill", "streaming"):
        return ""
    parts = [variant, f"{s.get('new_tokens', 0)} tokens"]
    if s.get("new_tokens", 0) > 1 and s.get("decode_tokens_per_s"):
        parts.append(f"{s['decode_tokens_per_s']:.1f} tok/s")
    if seed is not None:
        parts.append(f"seed {seed}")
    return "\n\n<sub>" + " · ".join(parts) + "</sub>"


def _answer_content(variant: str, answer: dict, seed) -> str:
    if answer.get("state") == "waiting" and variant != TERNARY:
        return WAITING
    text = answer.get("text") or ""
    if not text.strip():
        text = _finish_note(variant, answer)
    return text + _footer(variant, answer, seed)


def pane_messages(turns, pane: str) -> list[dict]:
    """One chat pane ("ternary" or "baseline") as Chatbot messages."""
    out = []
    for t in turns_of(turns):
        out.append({"role": "user", "content": t["user"]})
        if pane == TERNARY:
            variant = TERNARY
        else:
            variant = t.get("baseline") or NO_BASELINE
            if variant == NO_BASELINE or variant not in t["answers"]:
                out.append({"role": "assistant", "content": NOT_RUN_NONE})
                continue
        out.append({"role": "assistant",
                    "content": _answer_content(variant, t["answers"][variant], t.get("seed"))})
    return out
