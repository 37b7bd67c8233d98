"""The Gradio page: compare-mode chat, settings, stats, charts, sharing.

`build_demo(playground)` returns the gr.Blocks; app.py queues and launches it and adds the
OpenAI-compatible API routes to the same server.
Stable API names (gradio_client): /chat, /retry, /stop, /clear, /status.
"""

from __future__ import annotations

import contextlib

import gradio as gr

from .service import (NO_BASELINE, LABELS, ChatSettings, CpuBusy, NotReady, Playground, TooLong,
                      chart_frames, drop_last_exchange)

TITLE = "BitNet b1.58 on ONNX Runtime: ternary vs stock, side by side"
EXAMPLES = [  # the first for 2B4T, the last two also suit the Shakespeare demo model
    "Explain in three sentences why ternary weights make a language model faster on a CPU.",
    "Write a haiku about a 1.58-bit neural network.",
    "What light through yonder window breaks?",
    "Good morrow, my lord. What news from the court?",
]
DEFAULT_SYSTEM = "You are a helpful assistant."
CSS = """
#summary {min-height: 2.5em}
.pane-stats {font-size: 0.92em; min-height: 3.6em}
footer {display: none !important}
"""


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def build_demo(pg: Playground) -> gr.Blocks:
    with gr.Blocks(title="BitNet b1.58 playground", fill_width=True) as demo:
        gr.Markdown(f"## {TITLE}")
        banner = gr.Markdown(pg.banner_markdown(), elem_id="banner")
        with gr.Row(equal_height=False):
            baseline = gr.Dropdown(
                choices=[(LABELS.get(v, v), v) for v in BASELINES_INITIAL(pg)],
                value=pg.default_baseline() if pg.state == "ready" else "int2",
                label="Baseline (runs after the ternary engine, on the same cores)",
                elem_id="baseline", scale=2, allow_custom_value=False)
            gr.DeepLinkButton("Share this conversation (link)", copied_value="Link copied!",
                              scale=1)
        with gr.Row(equal_height=True):
            with gr.Column():
                gr.Markdown(f"**{LABELS['ternary']}**", elem_id="title-ternary")
                chat_t = gr.Chatbot(label="ternary", elem_id="chat-ternary", height=420,
                                    buttons=["copy", "copy_all"], feedback_options=None,
                                    layout="bubble")
                stats_t = gr.Markdown("**ternary** · idle", elem_id="stats-ternary",
                                      elem_classes=["pane-stats"])
            with gr.Column():
                title_b = gr.Markdown(_baseline_title(pg.default_baseline() if pg.state == "ready"
                                                      else "int2"), elem_id="title-baseline")
                chat_b = gr.Chatbot(label="baseline", elem_id="chat-baseline", height=420,
                                    buttons=["copy", "copy_all"], feedback_options=None,
                                    layout="bubble")
                stats_b = gr.Markdown("**baseline** · idle", elem_id="stats-baseline",
                                      elem_classes=["pane-stats"])
        summary = gr.Markdown("", elem_id="summary")
        with gr.Row():
            msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                             elem_id="message", scale=6, lines=1, max_lines=8, autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
        with gr.Row():
            retry = gr.Button("Retry", size="sm", elem_id="retry")
            clear = gr.Button("Clear", size="sm", elem_id="clear")
        gr.Examples(EXAMPLES, inputs=[msg], cache_examples=False, label="Examples")
        with gr.Row():
            speed_plot = gr.BarPlot(None, x="engine", y="decode tok/s", color="engine",
                                    title="Decode speed (tokens/s)", elem_id="speed-plot",
                                    height=260, y_lim=[0, None],
                                    sort=["ternary", "int2", "int4", "fp32"])
            time_plot = gr.LinePlot(None, x="seconds", y="tokens", color="engine",
                                    title="Tokens over time (each engine from its own start)",
                                    elem_id="time-plot", height=260)
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=2, elem_id="system")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=ChatSettings.temperature, step=0.05,
                                        label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=ChatSettings.top_p, step=0.05, label="Top-p")
                top_k = gr.Slider(0, 200, value=ChatSettings.top_k, step=1, label="Top-k (0 = off)")
            with gr.Row():
                rep = gr.Slider(0.8, 2.0, value=ChatSettings.repetition_penalty, step=0.05,
                                label="Repetition penalty (1 = off)")
                max_new = gr.Slider(1, 8192, value=ChatSettings.max_new_tokens, step=1,
                                    label="Max new tokens", elem_id="max-new-tokens")
                seed = gr.Number(ChatSettings.seed, precision=0,
                                 label="Seed (same on both engines; -1 = random)")
        with gr.Accordion("Raw stats (JSON)", open=False):
            raw = gr.JSON(None, elem_id="raw-stats")
        timer = gr.Timer(1.0, active=pg.state not in ("ready", "failed"))
        # The last values of the stats outputs of this session: an empty message sends them
        # back unchanged. (Not gr.skip(): in Gradio 6.31 an update to a component makes the
        # session record its later values under a new id, so deep links lose them.)
        last_shown = gr.State(None)

        settings_inputs = [system, baseline, max_new, temperature, top_p, top_k, rep, seed]
        outputs = [msg, chat_t, chat_b, stats_t, stats_b, summary, speed_plot, time_plot, raw,
                   last_shown]

        def unchanged(hist_t, hist_b, last):
            """Outputs that leave the page as it is."""
            rest = tuple(last) if last else tuple(gr.skip() for _ in range(6))
            return (gr.skip(), hist_t if hist_t is not None else gr.skip(),
                    hist_b if hist_b is not None else gr.skip()) + rest + (last,)

        def run(message, hist_t, hist_b, system_prompt, baseline_, max_new_tokens, temperature_,
                top_p_, top_k_, repetition_penalty, seed_, last, request, keep_box=False):
            message = message if isinstance(message, str) else ""
            if not message.strip():
                yield unchanged(hist_t, hist_b, last)
                return
            settings = ChatSettings(max_new_tokens=max_new_tokens, temperature=temperature_,
                                    top_p=top_p_, top_k=top_k_, repetition_penalty=repetition_penalty,
                                    seed=-1 if seed_ is None else seed_)
            try:
                states = pg.compare(message, hist_t, hist_b, system_prompt, baseline_, settings,
                                    session=_session(request))
                first = True
                with contextlib.closing(states):  # a cancelled request closes the engine's loop
                    for s in states:
                        # the charts appear once both engines are done
                        speed, timeline = chart_frames(s["results"]) if s["final"] else (None, None)
                        raw_value = {v: {"finish_reason": r.get("finish_reason"), "stats": r.get("stats"),
                                         "text": r.get("text"), "time_limit": bool(r.get("time_limit"))}
                                     for v, r in s["results"].items()}
                        shown_now = (s["stats_t"], s["stats_b"] or NO_BASELINE_STATS, s["summary"],
                                     speed, timeline, raw_value)
                        yield (("" if first and not keep_box else gr.skip()), s["chat_t"], s["chat_b"]) \
                            + shown_now + (shown_now if s["final"] else last,)
                        first = False
            except TooLong as e:
                raise gr.Error(str(e), title="Message too long") from None
            except CpuBusy as e:
                raise gr.Error(str(e), title="Busy") from None
            except NotReady as e:
                raise gr.Error(str(e), title="Not ready") from None

        def chat_fn(message, history_ternary, history_baseline, system_prompt, baseline,
                    max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, last,
                    request: gr.Request):
            """Send a message; stream the ternary engine's answer, then the baseline's."""
            yield from run(message, history_ternary, history_baseline, system_prompt, baseline,
                           max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, last,
                           request)

        def retry_fn(history_ternary, history_baseline, system_prompt, baseline, max_new_tokens,
                     temperature, top_p, top_k, repetition_penalty, seed, last, request: gr.Request):
            """Answer the last user message again (both panes)."""
            hist_t, message = drop_last_exchange(history_ternary)
            hist_b, _ = drop_last_exchange(history_baseline)
            if not message:
                yield unchanged(history_ternary, history_baseline, last)
                return
            yield from run(message, hist_t, hist_b, system_prompt, baseline, max_new_tokens,
                           temperature, top_p, top_k, repetition_penalty, seed, last, request,
                           keep_box=True)

        def stop_fn(request: gr.Request):
            """Stop the running generation of this session (the decode loop checks the flag)."""
            pg.stop(_session(request))

        def clear_fn():
            """Start a new conversation."""
            return ([], [], "**ternary** · idle", "**baseline** · idle", "", None, None, None, None)

        common = dict(outputs=outputs, concurrency_id="engine", concurrency_limit=1,
                      show_progress="full", show_progress_on=[chat_t, chat_b])
        chat_inputs = [msg, chat_t, chat_b] + settings_inputs + [last_shown]
        ev_send = send.click(chat_fn, chat_inputs, api_name="chat", **common)
        ev_submit = msg.submit(chat_fn, chat_inputs, api_visibility="private", **common)
        ev_retry = retry.click(retry_fn, [chat_t, chat_b] + settings_inputs + [last_shown],
                               api_name="retry", **common)
        stop.click(stop_fn, None, None, queue=False, api_name="stop")
        clear.click(clear_fn, None, [chat_t, chat_b, stats_t, stats_b, summary, speed_plot,
                                     time_plot, raw, last_shown], queue=False, api_name="clear")
        del ev_send, ev_submit, ev_retry

        baseline.change(_baseline_title, [baseline], [title_b], queue=False,
                        api_visibility="private", show_progress="hidden")

        def refresh(current=None):
            """Banner, baseline choices (known once the model folder is), pane title, timer."""
            done = pg.state in ("ready", "failed")
            if pg.state != "ready":
                return pg.banner_markdown(), gr.skip(), gr.skip(), gr.Timer(active=not done)
            choices = pg.baselines()
            value = current if current in choices else pg.default_baseline()
            return (pg.banner_markdown(), gr.update(choices=[(LABELS.get(v, v), v) for v in choices],
                                                    value=value),
                    _baseline_title(value), gr.Timer(active=False))

        timer.tick(refresh, [baseline], [banner, baseline, title_b, timer], queue=False,
                   api_visibility="private", show_progress="hidden")

        def on_load(current, request: gr.Request):
            prompt = ""
            if request is not None:
                prompt = request.query_params.get("prompt", "") or ""
            return (prompt[:20000] if prompt else gr.skip(),) + refresh(current)

        demo.load(on_load, [baseline], [msg, banner, baseline, title_b, timer], queue=False,
                  api_visibility="private", show_progress="hidden")

        def status() -> dict:
            """Model and engine status: state (preparing/ready/failed), live model, fallback,
            variants, active generations, recent log lines."""
            return pg.status()

        gr.api(status, api_name="status", queue=False)
    return demo


NO_BASELINE_STATS = "**baseline** · none selected"


def _baseline_title(choice: str) -> str:
    if choice == NO_BASELINE:
        return "**No baseline** (pick one above to compare)"
    return f"**Baseline: {LABELS.get(choice, choice)}**"


def BASELINES_INITIAL(pg: Playground) -> list[str]:  # noqa: N802 - reads like a constant
    return pg.baselines() if pg.state == "ready" else ["int2", "int4", "fp32", NO_BASELINE]


def launch_kwargs() -> dict:
    """Arguments of demo.launch() that style the page (Gradio 6 takes them at launch)."""
    return {"css": CSS, "theme": gr.themes.Soft()}
