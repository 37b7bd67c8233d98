"""The Gradio page: compare-mode chat, settings, stats, charts, sharing -- the layout, and
which handler (playground/handlers.py) each event runs.

`build_demo(playground)` returns the gr.Blocks; app.py queues and launches it and adds the
OpenAI-compatible API routes to the same server.
Stable API names (gradio_client): /chat, /retry, /edit, /stop, /clear, /status.
"""

from __future__ import annotations

import json

import gradio as gr

from .conversation import NO_BASELINE, TERNARY
from .formatting import LABELS, raw_stats, shown_chart_frames, stats_markdown
from .handlers import Layout, PageHandlers, SettingsForm, baseline_title
from .settings import PageSettings
from .storage import STORAGE_KEY, browser_secret

TITLE = "BitNet b1.58 on ONNX Runtime: ternary vs stock, side by side"
EXAMPLES = [  # the first for 2B4T, the last two also suit the Shakespeare demo model
    "Explain in three sentences why ternary weights make a language model faster on a CPU.",
    "Write a haiku about a 1.58-bit neural network.",
    "What light through yonder window breaks?",
    "Good morrow, my lord. What news from the court?",
]
CSS = """
#summary {min-height: 2.5em}
.pane-stats {font-size: 0.92em; min-height: 3.6em}
#cost-note, #edit-hint {font-size: 0.85em; opacity: 0.85}
#library-row {align-items: end}
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
  #page-links-note {font-size: 0.8em}
  #library-row {gap: 4px}
  #library-row button {flex: 1 1 28% !important; min-width: 0 !important}
}
"""
# No visitor or model text can make the page fetch a remote image (tracking pixels in shared
# links), and links leave without a referrer.
HEAD = ('<meta name="referrer" content="no-referrer">'
        '<meta http-equiv="Content-Security-Policy" content="img-src \'self\' data: blob:">'
        # (Gradio scopes `css` inside its container; this one is about the container itself:
        # the sticky message box of narrow screens needs no scroll container around it)
        '<style>@media (max-width: 640px) {.gradio-container {overflow: visible !important;'
        ' overflow-x: clip !important}}</style>'
        # The copy buttons copy an answer as it was generated: without the stats line the page
        # writes under it (conversation.py _footer), in one message and in "copy all".
        '<script>(() => {const c = navigator.clipboard; if (!c || !c.writeText) return;'
        ' const write = c.writeText.bind(c);'
        r' const stats = /\n\n<sub>(?:ternary|int2|int4|fp32) · [^<\n]*<\/sub>/g;'
        ' c.writeText = (text) => write(typeof text === "string" ? text.replace(stats, "") : text);'
        '})();'
        # a shared link pasted into a tab already on this page changes only the fragment
        ' window.addEventListener("hashchange", () => { if (location.hash.startsWith("#c=")) location.reload(); });'
        '</script>')
# The share button's link: this page's address + the fragment the server made, copied.
COPY_LINK_JS = """(fragment) => {
  const url = location.origin + location.pathname + fragment;
  navigator.clipboard?.writeText(url).catch(() => {});
  return url;
}"""
# A shared link's fragment, read once, then taken off the address (a reload shows the
# conversation from this browser's storage, where it now is).
READ_LINK_JS = """() => {
  const fragment = location.hash.startsWith('#c=') ? location.hash : '';
  if (fragment) history.replaceState(null, '', location.pathname + location.search);
  return fragment;
}"""
COST_NOTE = ("**Cost per token** (under each pane's stats): *CPU time* is the process CPU time of "
             "that answer divided by the tokens it generated, shared equally among the streams of "
             "a batch: CPU time, not measured energy (work outside its batch that ran at the same time, "
             "another visitor's baseline or API request, counts too). *Weights read* is the "
             "variant's weight bytes, which every decode step streams once, divided by the batch.")


def chat_pane(label: str, elem_id: str) -> gr.Chatbot:
    # text as typed: Gradio renders the markdown and sanitizes HTML (sanitize_html); editable
    # visitor messages: edit or resend any turn
    return gr.Chatbot(label=label, elem_id=elem_id, height=420, buttons=["copy", "copy_all"],
                      feedback_options=None, layout="bubble", editable="user",
                      sanitize_html=True, render_markdown=True)


def build_demo(pg) -> gr.Blocks:
    ready = pg.state == "ready"
    defaults = PageSettings(baseline=pg.default_baseline() if ready else "int2")
    with gr.Blocks(title="BitNet b1.58 playground", fill_width=True) as demo:
        gr.Markdown(f"## {TITLE}", elem_id="title")
        banner = gr.Markdown(pg.banner_markdown(), elem_id="banner")
        with gr.Row(elem_id="page-links", equal_height=False):
            # Gradio's footer has both; it hides its API link on narrow screens, this one opens
            # the same panel everywhere
            api_page = gr.Button("Use via API", size="sm", elem_id="api-page", scale=0,
                                 min_width=110)
            gr.Markdown("this page's endpoints, and an OpenAI-compatible API at `/v1` · light or "
                        "dark: *Settings* at the bottom of the page", elem_id="page-links-note")
        api_page.click(None, js="() => { document.querySelector('footer .show-api')?.click() }")
        with gr.Row(equal_height=False):
            baseline = gr.Dropdown(
                choices=[(LABELS.get(v, v), v) for v in (pg.baselines() if ready
                                                        else ["int2", "int4", "fp32", NO_BASELINE])],
                value=defaults.baseline,
                label="Baseline (runs after the ternary engine, on the same cores, same prompt and seed)",
                elem_id="baseline", scale=2, allow_custom_value=False)
            share = gr.Button("Share this conversation (link)", elem_id="share", scale=1)
        # the link holds the conversation itself (playground/links.py): nothing kept on the server
        share_link = gr.Textbox(label="Link to this conversation (copied; it carries the "
                                "conversation itself, nothing is stored on the server)",
                                elem_id="share-link", interactive=False, visible=False,
                                buttons=["copy"], max_lines=2)
        opened_link = gr.Textbox("", visible=False, elem_id="opened-link")
        with gr.Row(elem_id="library-row"):
            conversations = gr.Dropdown(choices=[], label="Conversation (kept in this browser)",
                                        elem_id="conversations", scale=3, min_width=160)
            title = gr.Textbox(label="Title (Enter to rename)", elem_id="conversation-title",
                               scale=2, min_width=120, max_lines=1)
            new_chat = gr.Button("New", size="sm", elem_id="new-conversation", min_width=60)
            delete_chat = gr.Button("Delete", size="sm", elem_id="delete-conversation", min_width=60)
            export_md = gr.DownloadButton("Export .md", size="sm", elem_id="export-md",
                                          min_width=80)
            export_json = gr.DownloadButton("Export .json", size="sm", elem_id="export-json",
                                            min_width=80)
            import_json = gr.UploadButton("Import .json", size="sm", elem_id="import-json",
                                          file_types=[".json"], type="filepath", min_width=80)
        with gr.Row(equal_height=True, elem_id="panes"):
            with gr.Column(min_width=160):
                gr.Markdown(f"**{LABELS[TERNARY]}**", elem_id="title-ternary")
                chat_t = chat_pane("ternary", "chat-ternary")
                stats_t = gr.Markdown(stats_markdown(TERNARY, None), elem_id="stats-ternary",
                                      elem_classes=["pane-stats"])
            with gr.Column(min_width=160):
                title_b = gr.Markdown(baseline_title(defaults.baseline), elem_id="title-baseline")
                chat_b = chat_pane("baseline", "chat-baseline")
                stats_b = gr.Markdown("**baseline** · idle", elem_id="stats-baseline",
                                      elem_classes=["pane-stats"])
        summary = gr.Markdown("", elem_id="summary")
        gr.Markdown(COST_NOTE, elem_id="cost-note")
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
        gr.Markdown("Any earlier message: its ✎ button edits it, or submit it unchanged to have "
                    "it answered again; the turns after it are dropped and both engines answer.",
                    elem_id="edit-hint")
        gr.Examples(EXAMPLES, inputs=[msg], cache_examples=False, label="Examples")
        with gr.Row(elem_id="plots"):
            # empty until a comparison is done, never None (see shown_chart_frames)
            no_speed, no_timeline = shown_chart_frames(None)
            speed_plot = gr.BarPlot(no_speed, x="engine", y="decode tok/s", color="engine",
                                    title="Decode speed (tok/s)", elem_id="speed-plot",
                                    height=260, y_lim=[0, None], min_width=160,
                                    sort=["ternary", "int2", "int4", "fp32"])
            time_plot = gr.LinePlot(no_timeline, x="seconds", y="tokens", color="engine",
                                    title="Tokens over time", elem_id="time-plot", height=260,
                                    min_width=160)
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            system = gr.Textbox(defaults.system, label="System prompt", lines=2, elem_id="system")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                        label="Temperature (0 = greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p",
                                  elem_id="top-p")
                top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k (0 = off)",
                                  elem_id="top-k")
            with gr.Row():
                rep = gr.Slider(0.8, 2.0, value=defaults.repetition_penalty, step=0.05,
                                label="Repetition penalty (1 = off)", elem_id="repetition-penalty")
                max_new = gr.Slider(1, pg.context_length or 8192, value=defaults.max_new_tokens,
                                    step=1, label="Max new tokens (up to the model's context)",
                                    elem_id="max-new-tokens")
                seed = gr.Number(defaults.seed, precision=0, elem_id="seed",
                                 label="Seed (-1 = a new random seed each answer; both engines share "
                                       "it; the stats show the one used)")
            with gr.Row():
                frequency = gr.Slider(-2.0, 2.0, value=defaults.frequency_penalty, step=0.05,
                                      label="Frequency penalty (0 = off; per time a token was "
                                            "generated)", elem_id="frequency-penalty")
                presence = gr.Slider(-2.0, 2.0, value=defaults.presence_penalty, step=0.05,
                                     label="Presence penalty (0 = off; once a token was generated)",
                                     elem_id="presence-penalty")
        with gr.Accordion("Raw stats (JSON)", open=False):
            # JSON as text: Gradio saves text values in shared links as they are
            raw = gr.Code(json.dumps(raw_stats(None, pg.hardware or None)), language="json",
                          interactive=False, elem_id="raw-stats", show_label=False)
        # The conversation itself: the one value every view above is rendered from (JSON text).
        conversation = gr.Textbox("[]", visible=False, elem_id="conversation")
        # ... and its copy in the browser's storage: a reload brings the conversation back
        secret, where = browser_secret()
        pg.progress(where)
        saved = gr.BrowserState(None, storage_key=STORAGE_KEY, secret=secret)
        timer = gr.Timer(1.0, active=pg.state not in ("ready", "failed"))

        form = SettingsForm(system=system, baseline=baseline, max_new_tokens=max_new,
                            temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=rep, seed=seed, frequency_penalty=frequency,
                            presence_penalty=presence)
        views = [chat_t, chat_b, stats_t, stats_b, summary, speed_plot, time_plot, raw]
        ui = Layout(banner=banner, title_b=title_b, send=send, msg=msg, views=views,
                    conversation=conversation, saved=saved, timer=timer, form=form,
                    conversations=conversations, title=title, export_md=export_md,
                    export_json=export_json, import_button=import_json, branch=gr.State(None),
                    share_link=share_link, opened_link=opened_link)
        wire(demo, PageHandlers(pg, ui), ui, stop=stop, retry=retry, edit=edit, clear=clear,
             panes=[chat_t, chat_b], new_chat=new_chat, delete_chat=delete_chat, share=share)
    return demo


def wire(demo: gr.Blocks, page: PageHandlers, ui: Layout, stop, retry, edit, clear, panes,
         new_chat, delete_chat, share) -> None:
    """The page's events."""
    outputs = [ui.msg] + ui.views + [ui.conversation]
    settings = ui.form.components()  # in the order of the API's parameters
    common = dict(outputs=outputs, show_progress="hidden", concurrency_limit=None)
    lock = dict(fn=page.lock, inputs=None, outputs=ui.send, queue=False, api_visibility="private")
    after = dict(fn=page.unlock_and_save, inputs=[ui.conversation, ui.saved],
                 outputs=[ui.send, ui.saved, ui.conversations, ui.title, ui.export_md, ui.export_json],
                 queue=False, api_visibility="private")
    chat_inputs = [ui.msg, ui.conversation] + settings
    ui.send.click(**lock).then(page.chat, chat_inputs, api_name="chat", **common).then(**after)
    ui.msg.submit(**lock).then(page.chat, chat_inputs, api_visibility="private", **common) \
        .then(**after)
    retry.click(**lock).then(page.retry, [ui.conversation] + settings, api_name="retry",
                             **common).then(**after)
    edit.click(page.edit, [ui.conversation], outputs, queue=False, api_name="edit").then(**after)
    stop.click(page.stop, None, None, queue=False, api_name="stop")
    clear.click(page.clear, None, ui.views + [ui.conversation], queue=False,
                api_name="clear").then(**after)
    for pane in panes:  # edit or resend any visitor turn; the pane's retry on the last answer
        pane.edit(page.take_edit, None, ui.branch, queue=False, api_visibility="private") \
            .then(**lock).then(page.run_branch, {ui.conversation, ui.branch, *settings},
                               api_visibility="private", **common).then(**after)
        pane.clear(page.clear, None, ui.views + [ui.conversation], queue=False,
                   api_visibility="private").then(**after)
        pane.retry(page.take_retry, None, ui.branch, queue=False, api_visibility="private") \
            .then(**lock).then(page.run_branch, {ui.conversation, ui.branch, *settings},
                               api_visibility="private", **common).then(**after)
    shown = dict(outputs=ui.shown_outputs(), queue=False, api_visibility="private",
                 show_progress="hidden")
    new_chat.click(page.new_conversation, {ui.saved, *settings}, **shown)
    delete_chat.click(page.delete_conversation, {ui.saved, *settings}, **shown)
    ui.conversations.input(page.switch_conversation, {ui.saved, ui.conversations, *settings},
                           **shown)
    ui.import_button.upload(page.import_conversation, {ui.saved, ui.import_button, *settings},
                            **dict(shown, queue=True))  # queued: its notice reaches the page
    ui.title.submit(page.rename_conversation, [ui.saved, ui.title],
                    [ui.saved, ui.conversations, ui.title, ui.export_md, ui.export_json],
                    queue=False, api_visibility="private", show_progress="hidden")
    ui.form.baseline.change(baseline_title, [ui.form.baseline], [ui.title_b], queue=False,
                            api_visibility="private", show_progress="hidden")

    refresh_outputs = [ui.banner, ui.title_b, ui.send, ui.timer] + settings
    ui.timer.tick(page.refresh, {ui.conversation, *settings}, refresh_outputs, queue=False,
                  api_visibility="private", show_progress="hidden")
    share.click(page.share, {ui.conversation, *settings}, [ui.share_link], queue=False,
                api_visibility="private", show_progress="hidden") \
        .then(None, [ui.share_link], [ui.share_link], js=COPY_LINK_JS)
    # the page, then a shared link in the address's fragment (which never reaches the server)
    demo.load(page.load, {ui.conversation, ui.saved, *settings},
              [ui.msg] + refresh_outputs + ui.shown_outputs(), queue=False,
              api_visibility="private", show_progress="hidden") \
        .then(None, None, [ui.opened_link], js=READ_LINK_JS) \
        .then(page.open_link, {ui.opened_link, ui.saved, *settings}, ui.shown_outputs(),
              api_visibility="private", show_progress="hidden")  # queued: its notice shows
    gr.api(page.status, api_name="status", queue=False)


def launch_kwargs() -> dict:
    """Arguments of demo.launch() that style the page (Gradio 6 takes them at launch)."""
    # Server-side rendering stays off (Spaces turns it on through GRADIO_SSR_MODE): everything
    # the page shows at first lives in the browser (the conversations in its storage, a shared
    # link in the address's fragment, which no server sees), so a server-rendered first paint
    # could only show an empty chat; and the /v1 API shares this server, which SSR would put
    # behind its Node proxy.
    return {"css": CSS, "theme": gr.themes.Soft(), "head": HEAD, "ssr_mode": False}
