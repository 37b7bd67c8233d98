"""The Gradio page: compare-mode chat, settings, stats, charts, sharing.

`build_demo(playground)` returns the gr.Blocks; app.py queues and launches it and adds the
OpenAI-compatible API routes to the same server.
Stable API names (gradio_client): /chat, /retry, /stop, /clear, /status.

The page keeps one thing, the conversation (a hidden JSON value, playground/conversation.py);
both chat panes, the stats lines, the verdict, the charts and the raw stats are rendered from
it, so a shared link or a reload restores exactly what was shown.
"""

from __future__ import annotations

import contextlib
import json
import logging

import gradio as gr

from .conversation import NO_BASELINE, TERNARY, dumps, pane_messages, turns_of
from .formatting import LABELS, chart_frames, raw_stats, stats_markdown, summary_line, turn_done
from .service import ChatSettings, CpuBusy, NotReady, Playground, TooLong

log = logging.getLogger("bitnet-onnx.app")

TITLE = "BitNet b1.58 on ONNX Runtime: ternary vs stock, side by side"
EXAMPLES = [  # the first for 2B4T, the last two also suit the Shakespeare demo model
    "Explain in three sentences why ternary weights make a language model faster on a CPU.",
    "Write a haiku about a 1.58-bit neural network.",
    "What light through yonder window breaks?",
    "Good morrow, my lord. What news from the court?",
]
DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_NEW = 256
CSS = """
#summary {min-height: 2.5em}
.pane-stats {font-size: 0.92em; min-height: 3.6em}
footer {display: none !important}
/* narrow screens: the panes side by side and shorter, the message box pinned to the bottom
   of the screen (reachable without scrolling past both panes), the charts one under the other */
@media (max-width: 640px) {
  #title h2 {font-size: 1.1em}
  #banner, .pane-stats {font-size: 0.8em}
  #chat-ternary, #chat-baseline {height: 180px !important; min-height: 180px !important}
  #panes {flex-wrap: nowrap !important; gap: 4px}
  #panes > div {min-width: 0 !important}
  #input-row {position: sticky; bottom: 0; z-index: 20; background: var(--body-background-fill);
              padding: 4px 0; flex-wrap: nowrap !important; gap: 4px}
  #input-row > * {min-width: 0 !important}
  #plots {flex-direction: column}
}
"""
# No visitor or model text can make the page fetch a remote image (tracking pixels in shared
# links), and links leave without a referrer.
HEAD = ('<meta name="referrer" content="no-referrer">'
        '<meta http-equiv="Content-Security-Policy" content="img-src \'self\' data: blob:">'
        # (Gradio scopes `css` inside its container; this one is about the container itself:
        # the sticky message box of narrow screens needs no scroll container around it)
        '<style>@media (max-width: 640px) {.gradio-container {overflow: visible !important;'
        ' overflow-x: clip !important}}</style>')


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def baseline_title(choice: str) -> str:
    if choice == NO_BASELINE:
        return f"**Baseline: {LABELS[NO_BASELINE]}** (pick one above to compare)"
    return f"**Baseline: {LABELS.get(choice, choice)}**"


def render(conversation, pg: Playground) -> tuple:
    """(chat_t, chat_b, stats_t, stats_b, summary, speed chart, timeline chart, raw stats) of a
    conversation: the last turn's numbers, every turn's messages."""
    turns = turns_of(conversation)
    last = turns[-1] if turns else None
    context = (last or {}).get("context") or pg.context_length
    if last is None:
        stats_t, stats_b = stats_markdown(TERNARY, None), "**baseline** · idle"
    else:
        stats_t = stats_markdown(TERNARY, last["answers"].get(TERNARY), context, pg.time_limit_s)
        base = last.get("baseline") or NO_BASELINE
        stats_b = (f"**{LABELS[NO_BASELINE]}** · no baseline ran for this turn" if base == NO_BASELINE
                   else stats_markdown(base, last["answers"].get(base), context, pg.time_limit_s))
    # the charts show the latest finished comparison (a chart that goes blank while the next
    # turn streams makes Gradio's plot throw on a removed element)
    speed, timeline = chart_frames(next((t for t in reversed(turns) if turn_done(t)), None))
    raw = json.dumps(raw_stats(last, pg.hardware or None), indent=1, ensure_ascii=False)
    return (pane_messages(turns, TERNARY), pane_messages(turns, "baseline"), stats_t, stats_b,
            summary_line(last, pg.time_limit_s), speed, timeline, raw)


def build_demo(pg: Playground) -> gr.Blocks:
    ready = pg.state == "ready"
    initial_baseline = pg.default_baseline() if ready else "int2"
    with gr.Blocks(title="BitNet b1.58 playground", fill_width=True) as demo:
        gr.Markdown(f"## {TITLE}", elem_id="title")
        banner = gr.Markdown(pg.banner_markdown(), elem_id="banner")
        with gr.Row(equal_height=False):
            baseline = gr.Dropdown(
                choices=[(LABELS.get(v, v), v) for v in (pg.baselines() if ready
                                                        else ["int2", "int4", "fp32", NO_BASELINE])],
                value=initial_baseline,
                label="Baseline (runs after the ternary engine, on the same cores, same prompt and seed)",
                elem_id="baseline", scale=2, allow_custom_value=False)
            gr.DeepLinkButton("Share this conversation (link)", copied_value="Link copied!", scale=1)
        with gr.Row(equal_height=True, elem_id="panes"):
            with gr.Column(min_width=160):
                gr.Markdown(f"**{LABELS[TERNARY]}**", elem_id="title-ternary")
                chat_t = gr.Chatbot(label="ternary", elem_id="chat-ternary", height=420,
                                    buttons=["copy", "copy_all"], feedback_options=None,
                                    layout="bubble")
                stats_t = gr.Markdown(stats_markdown(TERNARY, None), elem_id="stats-ternary",
                                      elem_classes=["pane-stats"])
            with gr.Column(min_width=160):
                title_b = gr.Markdown(baseline_title(initial_baseline), elem_id="title-baseline")
                chat_b = gr.Chatbot(label="baseline", elem_id="chat-baseline", height=420,
                                    buttons=["copy", "copy_all"], feedback_options=None,
                                    layout="bubble")
                stats_b = gr.Markdown("**baseline** · idle", elem_id="stats-baseline",
                                      elem_classes=["pane-stats"])
        summary = gr.Markdown("", elem_id="summary")
        with gr.Row(elem_id="input-row"):
            msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                             elem_id="message", scale=6, lines=1, max_lines=8, autofocus=True)
            send = gr.Button("Send" if ready else "Preparing the model…", variant="primary", scale=1,
                             elem_id="send", interactive=ready, min_width=80)
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop", min_width=60)
        with gr.Row():
            retry = gr.Button("Retry", size="sm", elem_id="retry")
            edit = gr.Button("Edit last message", size="sm", elem_id="edit")
            clear = gr.Button("Clear", size="sm", elem_id="clear")
        gr.Examples(EXAMPLES, inputs=[msg], cache_examples=False, label="Examples")
        with gr.Row(elem_id="plots"):
            speed_plot = gr.BarPlot(None, x="engine", y="decode tok/s", color="engine",
                                    title="Decode speed (tok/s)", elem_id="speed-plot",
                                    height=260, y_lim=[0, None], min_width=160,
                                    sort=["ternary", "int2", "int4", "fp32"])
            time_plot = gr.LinePlot(None, x="seconds", y="tokens", color="engine",
                                    title="Tokens over time", elem_id="time-plot", height=260,
                                    min_width=160)
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=2, elem_id="system")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.6, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", elem_id="top-p")
                top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)", elem_id="top-k")
            with gr.Row():
                rep = gr.Slider(0.8, 2.0, value=1.0, step=0.05, label="Repetition penalty (1 = off)",
                                elem_id="repetition-penalty")
                max_new = gr.Slider(1, pg.context_length or 8192, value=DEFAULT_MAX_NEW, step=1,
                                    label="Max new tokens (up to the model's context)",
                                    elem_id="max-new-tokens")
                seed = gr.Number(-1, precision=0, elem_id="seed",
                                 label="Seed (-1 = a new random seed each answer; both engines share "
                                       "it; the stats show the one used)")
        with gr.Accordion("Raw stats (JSON)", open=False):
            # JSON as text: Gradio saves text values in shared links as they are
            raw = gr.Code(json.dumps(raw_stats(None, pg.hardware or None)), language="json",
                          interactive=False, elem_id="raw-stats", show_label=False)
        # The conversation itself: the one value every view above is rendered from (JSON text).
        conversation = gr.Textbox("[]", visible=False, elem_id="conversation")
        # ... and its copy in the browser's storage: a reload brings the conversation back
        saved = gr.BrowserState("[]", storage_key="bitnet-onnx-conversation")
        timer = gr.Timer(1.0, active=pg.state not in ("ready", "failed"))

        settings_inputs = [system, baseline, max_new, temperature, top_p, top_k, rep, seed]
        views = [chat_t, chat_b, stats_t, stats_b, summary, speed_plot, time_plot, raw]
        outputs = [msg] + views + [conversation]

        def refused(message: str, conv, why: str, title: str):
            """A visitor's error: a toast, the page as it was, the message kept to edit."""
            log.warning("page request refused (%s): %s", title, why.splitlines()[0])
            gr.Warning(why, title=title)
            shown = render(conv, pg)
            return (message,) + shown[:4] + (f"⚠️ {why}",) + shown[5:] + (dumps(conv),)

        def run(message, conv, system_prompt, baseline_, max_new_tokens, temperature_, top_p_,
                top_k_, repetition_penalty, seed_, request, keep_box=False):
            message = message if isinstance(message, str) else ""
            if not message.strip():
                yield (gr.skip(),) + render(conv, pg) + (dumps(conv),)
                return
            if pg.stop_pending(_session(request)):
                gr.Warning("An answer is still being written: wait for it or press Stop.",
                           title="Busy")
                yield tuple(gr.skip() for _ in outputs)
                return
            settings = ChatSettings(max_new_tokens=max_new_tokens, temperature=temperature_,
                                    top_p=top_p_, top_k=top_k_, repetition_penalty=repetition_penalty,
                                    seed=-1 if seed_ is None else seed_)
            try:
                states = pg.compare(message, conv, system_prompt, baseline_, settings,
                                    session=_session(request))
                first = True
                with contextlib.closing(states):  # a cancelled request closes the engine's loop
                    for turns, _final in states:
                        yield (("" if first and not keep_box else gr.skip()),) + render(turns, pg) \
                            + (dumps(turns),)
                        first = False
            except TooLong as e:
                yield refused(message, conv, str(e), "Message too long")
            except CpuBusy as e:
                yield refused(message, conv, str(e), "Busy")
            except NotReady as e:
                yield refused(message, conv, str(e), "Not ready")

        def chat_fn(message, conversation_, system_prompt, baseline, max_new_tokens, temperature,
                    top_p, top_k, repetition_penalty, seed, request: gr.Request):
            """Send a message; stream the ternary engine's answer, then the baseline's."""
            yield from run(message, conversation_, system_prompt, baseline, max_new_tokens,
                           temperature, top_p, top_k, repetition_penalty, seed, request)

        def retry_fn(conversation_, system_prompt, baseline, max_new_tokens, temperature, top_p,
                     top_k, repetition_penalty, seed, request: gr.Request):
            """Answer the last user message again (both panes), replacing that turn."""
            turns = turns_of(conversation_)
            if not turns:
                yield (gr.skip(),) + render(turns, pg) + (dumps(turns),)
                return
            yield from run(turns[-1]["user"], turns[:-1], system_prompt, baseline, max_new_tokens,
                           temperature, top_p, top_k, repetition_penalty, seed, request, keep_box=True)

        def edit_fn(conversation_):
            """Edit the last message: it goes back to the box and its turn leaves the chat."""
            turns = turns_of(conversation_)
            if not turns:
                return (gr.skip(),) + render(turns, pg) + (dumps(turns),)
            return (turns[-1]["user"],) + render(turns[:-1], pg) + (dumps(turns[:-1]),)

        def stop_fn(request: gr.Request):
            """Stop this session's turns: the running engine after its current token, a turn
            waiting for the CPU at once."""
            pg.stop(_session(request))

        def clear_fn():
            """Start a new conversation."""
            return render([], pg) + ("[]",)

        def lock():
            return gr.update(interactive=False, value="Answering…")

        def unlock():
            return gr.update(interactive=pg.state == "ready", value="Send")

        common = dict(outputs=outputs, show_progress="hidden", concurrency_limit=None)
        chat_inputs = [msg, conversation] + settings_inputs
        def unlock_and_save(conv):
            return unlock(), conv

        after = dict(fn=unlock_and_save, inputs=[conversation], outputs=[send, saved], queue=False,
                     api_visibility="private")
        send.click(lock, None, send, queue=False, api_visibility="private") \
            .then(chat_fn, chat_inputs, api_name="chat", **common).then(**after)
        msg.submit(lock, None, send, queue=False, api_visibility="private") \
            .then(chat_fn, chat_inputs, api_visibility="private", **common).then(**after)
        retry.click(lock, None, send, queue=False, api_visibility="private") \
            .then(retry_fn, [conversation] + settings_inputs, api_name="retry", **common).then(**after)
        edit.click(edit_fn, [conversation], outputs, queue=False, api_name="edit").then(**after)
        stop.click(stop_fn, None, None, queue=False, api_name="stop")
        clear.click(clear_fn, None, views + [conversation], queue=False, api_name="clear").then(**after)

        baseline.change(baseline_title, [baseline], [title_b], queue=False,
                        api_visibility="private", show_progress="hidden")

        setting_fields = [("system", system), ("max_new_tokens", max_new), ("temperature", temperature),
                          ("top_p", top_p), ("top_k", top_k), ("repetition_penalty", rep), ("seed", seed)]

        def refresh(current=None, conv=None, *values):
            """Banner; once ready: baseline choices (known once the model folder is), max new
            tokens bound to the live model's context, Send enabled; and the settings of a shared
            link's conversation (its last turn's), baseline included. Settings go back as plain
            values (their own when there is nothing to restore): in Gradio 6.31 an update dict
            makes the session record the component under a new id, which shared links lose."""
            done = pg.state in ("ready", "failed")
            values = list(values) + [None] * (len(setting_fields) - len(values))
            if pg.state != "ready":
                return ((pg.banner_markdown(),) + tuple(gr.skip() for _ in range(3))
                        + tuple(v if v is not None else gr.skip() for v in values)
                        + (gr.Timer(active=not done),))
            choices = pg.baselines()
            turns = turns_of(conv)
            used = (turns[-1].get("settings") or {}) if turns else {}
            if turns and turns[-1].get("baseline") in choices:  # a shared link: its baseline
                current = turns[-1]["baseline"]
            value = current if current in choices else pg.default_baseline()
            context = pg.context_length or 8192
            restored = []
            for (name, _), own in zip(setting_fields, values):
                v = used.get(name, own)
                if name == "max_new_tokens":
                    v = DEFAULT_MAX_NEW if v is None else v
                    restored.append(gr.update(maximum=context, value=min(int(v), context)))
                else:
                    restored.append(v if v is not None else gr.skip())
            return ((pg.banner_markdown(),
                     gr.update(choices=[(LABELS.get(v, v), v) for v in choices], value=value),
                     baseline_title(value), gr.update(interactive=True, value="Send"))
                    + tuple(restored) + (gr.Timer(active=False),))

        refresh_outputs = [banner, baseline, title_b, send] + [c for _, c in setting_fields] + [timer]
        refresh_inputs = [baseline, conversation] + [c for _, c in setting_fields]
        def tick(current, conv, system_, max_new_, temperature_, top_p_, top_k_, rep_, seed_):
            return refresh(current, conv, system_, max_new_, temperature_, top_p_, top_k_, rep_, seed_)

        timer.tick(tick, refresh_inputs, refresh_outputs, queue=False,
                   api_visibility="private", show_progress="hidden")

        def on_load(current, conv, stored, system_, max_new_, temperature_, top_p_, top_k_, rep_,
                    seed_, request: gr.Request):
            """?prompt= fills the box; a shared link's conversation shows as it was, else the
            one this browser kept (a reload), with their settings."""
            prompt = ""
            if request is not None:
                prompt = request.query_params.get("prompt", "") or ""
            if not turns_of(conv) and turns_of(stored):
                conv = stored
            return ((prompt[:20000] if prompt else gr.skip(),)
                    + refresh(current, conv, system_, max_new_, temperature_, top_p_, top_k_, rep_, seed_)
                    + render(conv, pg) + (dumps(conv),))

        demo.load(on_load, [baseline, conversation, saved] + [c for _, c in setting_fields],
                  [msg] + refresh_outputs + views + [conversation], queue=False,
                  api_visibility="private", show_progress="hidden")

        def status() -> dict:
            """Model and engine status: state (preparing/ready/failed), live model, fallback,
            variants, hardware, active generations, recent log lines."""
            return pg.status()

        gr.api(status, api_name="status", queue=False)
    return demo


def launch_kwargs() -> dict:
    """Arguments of demo.launch() that style the page (Gradio 6 takes them at launch)."""
    return {"css": CSS, "theme": gr.themes.Soft(), "head": HEAD}
