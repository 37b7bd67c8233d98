"""What the page prints about a turn: each pane's stats line, the verdict line, the charts,
the raw stats. Pure functions of a turn (playground/conversation.py), so a shared link or a
reload shows exactly what the visitor saw."""

from __future__ import annotations

from .conversation import NO_BASELINE, TERNARY, downsample, ran

LABELS = {"ternary": "ternary (BitLinear)", "int2": "int2 (stock ORT MatMulNBits 2-bit)",
          "int4": "int4 (stock ORT MatMulNBits 4-bit)", "fp32": "fp32 (stock ORT MatMul)",
          NO_BASELINE: "none (ternary only)"}
CHART_TIMELINE_POINTS = 240
# Below this many decoded tokens per engine a speed ratio is mostly noise (one slow token
# swings it several-fold): the verdict says so instead of printing a headline ratio.
MIN_DECODED_TO_COMPARE = 32
STATE_LABELS = {"waiting": "waiting for the ternary engine", "prefill": "prefill…",
                "streaming": "streaming…", "gate": "waiting for the CPU (API requests ahead)…",
                "loading": "loading the engine…", "stopped": "stopped"}


def fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms" if seconds >= 0.01 \
        else f"{seconds * 1000:.1f} ms"


def finish_label(answer: dict, context: int | None, time_limit_s: float | None = None) -> str:
    """done / done (max new tokens) / context full / stopped / cut at the time limit."""
    reason = answer.get("finish_reason")
    s = answer.get("stats") or {}
    if reason == "length":
        if context and s.get("prompt_tokens", 0) + s.get("new_tokens", 0) >= int(context):
            return "context full"
        return "done (max new tokens)"
    if reason == "time":
        return f"cut at the {time_limit_s:.0f} s time limit" if time_limit_s else "cut at the time limit"
    if reason == "cancelled":
        return "stopped"
    return "done"


def stats_markdown(variant: str, answer: dict | None, context: int | None = None,
                   time_limit_s: float | None = None) -> str:
    """One pane's stats line for one answer."""
    if answer is None:
        return f"**{LABELS.get(variant, variant)}** · idle"
    state = answer.get("state")
    label = STATE_LABELS.get(state) or finish_label(answer, context, time_limit_s)
    head = f"**{LABELS.get(variant, variant)}** · {label}"
    s = answer.get("stats")
    if not s:
        return head
    n = s.get("new_tokens", 0)
    parts = [
        f"TTFT **{fmt_s(s['ttft_s'])}**" if n else "TTFT –",
        f"prefill **{s['prefill_tokens_per_s']:.1f} tok/s**" if n else "prefill –",
        f"decode **{s['decode_tokens_per_s']:.1f} tok/s**" if n > 1 else "decode –",
        f"tokens **{s.get('prompt_tokens', 0)}** in + **{n}** out",
    ]
    if s.get("max_batch_size"):  # ran through the batcher: the streams it shared steps with
        parts.append(f"batch **{s['max_batch_size']}** (mean {s.get('batch_size', 0):.1f})")
    if context:
        used = s.get("prompt_tokens", 0) + n
        parts.append(f"context {used}/{context} ({100 * used / int(context):.0f}%)")
    mem = []
    if answer.get("weights_mb"):
        mem.append(f"weights **{fmt_mb(answer['weights_mb'])}**")
    if s.get("rss_mb"):
        mem.append(f"process RSS {fmt_mb(s['rss_mb'])}")
    if mem:
        parts.append(" · ".join(mem))
    cost = cost_line(s)
    return head + "  \n" + " · ".join(parts) + (f"  \n{cost}" if cost else "")


def cost_line(stats: dict) -> str:
    """Cost per generated token: CPU time (playground/turns.py with_cost) and weights read."""
    parts = []
    if stats.get("cpu_ms_per_token"):
        parts.append(f"CPU time **{stats['cpu_ms_per_token']:.2f} ms/token**")
    if stats.get("weights_mb_per_token"):
        parts.append(f"weights read **{fmt_mb(stats['weights_mb_per_token'])}/token**")
    return ("cost: " + " · ".join(parts)) if parts else ""


def summary_line(turn: dict | None, time_limit_s: float | None = None) -> str:
    """The one-line verdict of a turn. A speed ratio only for two runs of the same prompt that
    both decoded enough tokens to compare."""
    if not turn:
        return ""
    answers = turn["answers"]
    t = answers.get(TERNARY) or {}
    ts = t.get("stats")
    base = turn.get("baseline") or NO_BASELINE
    b = answers.get(base) if base != NO_BASELINE else None
    if t.get("state") in ("waiting", "prefill", "streaming", "gate", "loading"):
        return "Ternary engine answering…"
    if b and b.get("state") in ("waiting", "prefill", "streaming", "gate", "loading") and ran(t):
        return f"{base} engine answering…"
    stopped = "Stopped. " if any(a.get("finish_reason") == "cancelled" for a in answers.values()) else ""
    cut = [v for v, a in answers.items() if a.get("finish_reason") == "time"]
    tail = (f" ({' and '.join(cut)} cut at the {time_limit_s or 0:.0f} s time limit: its rates "
            "cover the tokens it wrote.)") if cut else ""
    if not ran(t):
        return stopped + "The ternary engine did not run." + tail
    if not ran(b):
        why = "no baseline selected" if base == NO_BASELINE else f"the {base} baseline did not run"
        return (f"{stopped}Ternary engine: {ts['decode_tokens_per_s']:.1f} tok/s decode, "
                f"TTFT {fmt_s(ts['ttft_s'])} ({why}).{tail}")
    bs = b["stats"]
    if ts.get("prompt_tokens") != bs.get("prompt_tokens"):  # never expected: one history
        return (f"{stopped}Not compared: the engines saw different prompts "
                f"({ts.get('prompt_tokens')} vs {bs.get('prompt_tokens')} tokens).{tail}")
    decoded = min(ts["new_tokens"], bs["new_tokens"]) - 1
    td, bd = ts["decode_tokens_per_s"], bs["decode_tokens_per_s"]
    rates = (f"({td:.1f} vs {bd:.1f} tok/s decode; prefill {ts['prefill_tokens_per_s']:.0f} vs "
             f"{bs['prefill_tokens_per_s']:.0f} tok/s; TTFT {fmt_s(ts['ttft_s'])} vs {fmt_s(bs['ttft_s'])})")
    if decoded < MIN_DECODED_TO_COMPARE or td <= 0 or bd <= 0:
        line = (f"**Speed-up: too short to compare** ({max(decoded, 0)} decoded tokens; "
                f"{MIN_DECODED_TO_COMPARE} needed for a fair ratio) {rates}")
    elif td >= bd:
        line = f"**Speed-up: ternary decodes {td / bd:.2f}x as fast as {base}** {rates}"
    else:
        line = f"**Speed-up: none, {base} decodes {bd / td:.2f}x as fast as ternary** {rates}"
    wt, wb = t.get("weights_mb"), b.get("weights_mb")
    if wt and wb:
        line += f" · **memory: {wt / wb:.2f}x** the {base} weights ({fmt_mb(wt)} vs {fmt_mb(wb)})"
    return stopped + line + "." + tail


def turn_done(turn: dict | None) -> bool:
    """Every engine of the turn finished, and at least one wrote a token."""
    return bool(turn) and all(a.get("state") in ("done", "stopped", "skipped")
                              for a in turn["answers"].values()) \
        and any(ran(a) for a in turn["answers"].values())


def chart_frames(turn: dict | None):
    """(decode tok/s per engine, tokens over time) as pandas DataFrames for the native plots;
    (None, None) until the turn is done (a half-drawn chart would compare unlike runs)."""
    import pandas as pd

    if not turn_done(turn):
        return None, None
    done = {v: a for v, a in turn["answers"].items() if ran(a)}
    speed = pd.DataFrame(
        [{"engine": v, "decode tok/s": round(a["stats"]["decode_tokens_per_s"], 2)} for v, a in done.items()],
        columns=["engine", "decode tok/s"])
    rows = []
    for v, a in done.items():
        for t, n in downsample(a.get("timeline") or [], CHART_TIMELINE_POINTS):
            rows.append({"seconds": round(t, 4), "tokens": n, "engine": v})
    timeline = pd.DataFrame(rows, columns=["seconds", "tokens", "engine"])
    return speed, timeline


def shown_chart_frames(turn: dict | None):
    """The charts' values: chart_frames of a finished turn, else frames with no rows. A chart
    never gets None once drawn: Gradio's native plot then removes its element, and the resize
    observers it keeps from earlier draws read the removed element's width and throw."""
    import pandas as pd

    speed, timeline = chart_frames(turn)
    if speed is not None:
        return speed, timeline
    return (pd.DataFrame({"engine": pd.Series(dtype=str), "decode tok/s": pd.Series(dtype=float)}),
            pd.DataFrame({"seconds": pd.Series(dtype=float), "tokens": pd.Series(dtype=int),
                          "engine": pd.Series(dtype=str)}))


def raw_stats(turn: dict | None, hardware: dict | None = None) -> dict:
    """The raw stats accordion: each engine of the last turn, its seed, and the hardware."""
    engines = {} if not turn else {
        v: {"finish_reason": a.get("finish_reason"), "stats": a.get("stats"), "text": a.get("text"),
            "time_limit": a.get("finish_reason") == "time"} for v, a in turn["answers"].items()}
    return {"engines": engines, "seed": (turn or {}).get("seed"), "hardware": hardware or {}}
