"""The playground's conversation and what the page prints about it, without a server:
one history for both engines, notes that never reach a model, safe rendering, honest verdicts."""

from __future__ import annotations

from playground.conversation import (NOT_RUN_NONE, WAITING, model_messages, new_turn,
                                     pane_messages)
from playground.formatting import (MIN_DECODED_TO_COMPARE, chart_frames, finish_label,
                                   raw_stats, stats_markdown, summary_line)


def stats(new_tokens=40, prompt_tokens=30, decode=40.0, **kw):
    return {"decode_tokens_per_s": decode, "prefill_tokens_per_s": 200.0, "ttft_s": 0.25,
            "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "rss_mb": 1500.0, **kw}


def answered(turn, variant, text, finish="length", **kw):
    turn["answers"][variant].update(text=text, state="done", finish_reason=finish, stats=stats(**kw),
                                    weights_mb=500.0 if variant == "ternary" else 1000.0,
                                    timeline=[(0.0, 0), (0.1, 5)])
    return turn


def test_one_history_the_ternary_answers():
    t1 = answered(answered(new_turn("first", "int2", 1, 4096), "ternary", "T1"), "int2", "B1")
    t2 = new_turn("second", "none", 2, 4096)
    answered(t2, "ternary", "T2 partial", finish="cancelled")
    t3 = new_turn("third", "int4", 3, 4096)  # stopped before any token: both not run
    t3["answers"]["ternary"].update(state="stopped", finish_reason="cancelled")
    t3["answers"]["int4"].update(state="stopped", finish_reason="cancelled")
    turns = [t1, t2, t3]
    assert model_messages(turns, "sys") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "T1"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "T2 partial"}]
    # the baseline pane shows the baseline's own answers, "not run" where it did not run
    b = pane_messages(turns, "baseline")
    assert [m["role"] for m in b] == ["user", "assistant"] * 3
    assert b[1]["content"].startswith("B1") and "int2" in b[1]["content"]
    assert b[3]["content"] == NOT_RUN_NONE
    assert "int4 not run" in b[5]["content"]
    t = pane_messages(turns, "ternary")
    assert t[1]["content"].startswith("T1") and t[3]["content"].startswith("T2 partial")
    assert "not run" in t[5]["content"]
    # nothing of the panes (notes, footers) is in what the model reads
    for m in model_messages(turns):
        assert "<sub>" not in m["content"] and "not run" not in m["content"]


def test_waiting_baseline_and_footer_with_seed():
    turn = answered(new_turn("q", "int2", 1234, 4096), "ternary", "answer")
    b = pane_messages([turn], "baseline")
    assert b[-1]["content"] == WAITING
    footer = pane_messages([turn], "ternary")[-1]["content"]
    assert "seed 1234" in footer and "40.0 tok/s" in footer and "40 tokens" in footer


def test_visitor_and_model_text_reach_the_panes_as_typed():
    """No escaping by hand: the panes get the text itself (Gradio renders the markdown and
    sanitizes HTML; the page's CSP blocks remote images: tests/test_app_browser.py)."""
    raw = 'Hi <script>alert("x")</script> & `a<b` ![x](http://evil.example/p.png)'
    turn = answered(new_turn(raw, "int2", 1, 4096), "ternary", raw)
    user, answer = pane_messages([turn], "ternary")
    assert user["content"] == raw and answer["content"].split("\n\n<sub>")[0] == raw


def test_verdict_compares_only_like_runs():
    turn = answered(answered(new_turn("q", "int2", 1, 4096), "ternary", "a", decode=40.0), "int2", "b",
                    decode=20.0)
    line = summary_line(turn)
    assert "ternary decodes 2.00x as fast as int2" in line and "memory: 0.50x" in line
    assert "\n" not in line
    slow = answered(answered(new_turn("q", "int2", 1, 4096), "ternary", "a", decode=10.0), "int2", "b",
                    decode=67.0)
    assert "int2 decodes 6.70x as fast as ternary" in summary_line(slow)
    short = answered(answered(new_turn("q", "int2", 1, 4096), "ternary", "a", new_tokens=5), "int2",
                     "b", new_tokens=5)
    line = summary_line(short)
    assert "too short to compare" in line and f"{MIN_DECODED_TO_COMPARE} needed" in line
    assert "x as fast" not in line
    unlike = answered(answered(new_turn("q", "int2", 1, 4096), "ternary", "a"), "int2", "b",
                      prompt_tokens=31)
    assert "Not compared" in summary_line(unlike)
    alone = answered(new_turn("q", "none", 1, 4096), "ternary", "a")
    assert "no baseline selected" in summary_line(alone)


def test_stats_line_context_meter_and_context_full():
    turn = answered(new_turn("q", "int2", 1, 100), "ternary", "a", new_tokens=70, prompt_tokens=30)
    a = turn["answers"]["ternary"]
    assert finish_label(a, 100) == "context full"
    assert finish_label(a, 4096) == "done (max new tokens)"
    md = stats_markdown("ternary", a, 100)
    assert "context full" in md and "context 100/100 (100%)" in md
    assert "TTFT **250 ms**" in md and "decode **40.0 tok/s**" in md and "**30** in + **70** out" in md
    assert "weights **500 MB**" in md


def test_charts_and_raw_stats_only_for_finished_turns():
    turn = answered(new_turn("q", "int2", 9, 4096), "ternary", "a")
    assert chart_frames(turn) == (None, None)  # the baseline is still to run
    answered(turn, "int2", "b")
    speed, timeline = chart_frames(turn)
    assert set(speed["engine"]) == {"ternary", "int2"} and set(timeline["engine"]) == {"ternary", "int2"}
    raw = raw_stats(turn, {"cpu": "x"})
    assert set(raw["engines"]) == {"ternary", "int2"} and raw["seed"] == 9
    assert raw["hardware"] == {"cpu": "x"}
