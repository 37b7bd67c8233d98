"""The page's event handlers (playground/ui.py lays the page out and wires them).

`PageHandlers(pg, layout)` holds the Playground and the components it reads and writes; its
methods are the handlers. The page keeps one thing, the conversation (a hidden JSON value,
playground/conversation.py): both chat panes, the stats lines, the verdict, the charts and
the raw stats are rendered from it (`render`), so a shared link or a reload restores exactly
what was shown. The settings travel as one `PageSettings` (playground/settings.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, fields

import gradio as gr

from .conversation import NO_BASELINE, TERNARY, dumps, pane_messages, turns_of
from .formatting import LABELS, chart_frames, raw_stats, stats_markdown, summary_line, turn_done
from .gates import CpuBusy
from .settings import PageSettings
from .turns import NotReady, TooLong

log = logging.getLogger("bitnet-onnx.app")


@dataclass
class SettingsForm:
    """The components that hold a PageSettings, one per field (same names)."""

    system: gr.Textbox
    baseline: gr.Dropdown
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    repetition_penalty: gr.Slider
    seed: gr.Number

    def components(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    def read(self, data: dict) -> PageSettings:
        """The settings from a handler's {component: value} input."""
        return PageSettings.from_values({f.name: data.get(getattr(self, f.name)) for f in fields(self)})

    def write(self, settings: PageSettings, context: int) -> dict:
        """{component: value} showing `settings`; max new tokens bounded by the model's context.
        Plain values: in Gradio 6.31 an update dict makes the session record the component
        under a new id, which shared links lose (the slider's bound needs one)."""
        out = {getattr(self, name): value for name, value in settings.as_dict().items()}
        out[self.max_new_tokens] = gr.update(maximum=context,
                                             value=min(int(settings.max_new_tokens), context))
        del out[self.baseline]  # its choices come with it: see PageHandlers.refresh
        return out


@dataclass
class Layout:
    """The components the handlers write."""

    banner: gr.Markdown
    title_b: gr.Markdown
    send: gr.Button
    msg: gr.Textbox
    views: list  # chat_t, chat_b, stats_t, stats_b, summary, speed plot, timeline plot, raw
    conversation: gr.Textbox
    saved: gr.BrowserState
    timer: gr.Timer
    form: SettingsForm


def session_of(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "default"


def baseline_title(choice: str) -> str:
    if choice == NO_BASELINE:
        return f"**Baseline: {LABELS[NO_BASELINE]}** (pick one above to compare)"
    return f"**Baseline: {LABELS.get(choice, choice)}**"


def render(conversation, pg) -> tuple:
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


class PageHandlers:
    def __init__(self, pg, layout: Layout):
        self.pg, self.ui = pg, layout

    # -- a turn ---------------------------------------------------------------------------------
    def chat(self, message, conversation_, system_prompt, baseline, max_new_tokens, temperature,
             top_p, top_k, repetition_penalty, seed, request: gr.Request):
        """Send a message; stream the ternary engine's answer, then the baseline's."""
        settings = PageSettings.from_values(dict(
            system=system_prompt, baseline=baseline, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed))
        yield from self._run(message, conversation_, settings, session_of(request))

    def retry(self, conversation_, system_prompt, baseline, max_new_tokens, temperature, top_p,
              top_k, repetition_penalty, seed, request: gr.Request):
        """Answer the last user message again (both panes), replacing that turn."""
        turns = turns_of(conversation_)
        if not turns:
            yield (gr.skip(),) + render(turns, self.pg) + (dumps(turns),)
            return
        settings = PageSettings.from_values(dict(
            system=system_prompt, baseline=baseline, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed))
        yield from self._run(turns[-1]["user"], turns[:-1], settings, session_of(request),
                             keep_box=True)

    def _run(self, message, conv, settings: PageSettings, session: str, keep_box=False):
        pg = self.pg
        message = message if isinstance(message, str) else ""
        if not message.strip():
            yield (gr.skip(),) + render(conv, pg) + (dumps(conv),)
            return
        if pg.stop_pending(session):
            gr.Warning("An answer is still being written: wait for it or press Stop.", title="Busy")
            yield tuple(gr.skip() for _ in range(len(self.ui.views) + 2))
            return
        try:
            states = pg.compare(message, conv, settings.system, settings.baseline, settings.chat(),
                                session=session)
            first = True
            with contextlib.closing(states):  # a cancelled request closes the engine's loop
                for turns, _final in states:
                    yield (("" if first and not keep_box else gr.skip()),) + render(turns, pg) \
                        + (dumps(turns),)
                    first = False
        except TooLong as e:
            yield self._refused(message, conv, str(e), "Message too long")
        except CpuBusy as e:
            yield self._refused(message, conv, str(e), "Busy")
        except NotReady as e:
            yield self._refused(message, conv, str(e), "Not ready")

    def _refused(self, message: str, conv, why: str, title: str) -> tuple:
        """A visitor's error: a toast, the page as it was, the message kept to edit."""
        log.warning("page request refused (%s): %s", title, why.splitlines()[0])
        gr.Warning(why, title=title)
        shown = render(conv, self.pg)
        return (message,) + shown[:4] + (f"⚠️ {why}",) + shown[5:] + (dumps(conv),)

    def edit(self, conversation_):
        """Edit the last message: it goes back to the box and its turn leaves the chat."""
        turns = turns_of(conversation_)
        if not turns:
            return (gr.skip(),) + render(turns, self.pg) + (dumps(turns),)
        return (turns[-1]["user"],) + render(turns[:-1], self.pg) + (dumps(turns[:-1]),)

    def stop(self, request: gr.Request):
        """Stop this session's turns: the running engine after its current token, a turn
        waiting for the CPU at once."""
        self.pg.stop(session_of(request))

    def clear(self):
        """Start a new conversation."""
        return render([], self.pg) + ("[]",)

    # -- the Send button and the browser's copy -------------------------------------------------------
    def lock(self):
        return gr.update(interactive=False, value="Answering…")

    def unlock_and_save(self, conv):
        return gr.update(interactive=self.pg.state == "ready", value="Send"), conv

    # -- start-up, a shared link, a reload --------------------------------------------------------------
    def refresh(self, data: dict) -> dict:
        """Banner; once ready: baseline choices (known once the model folder is), max new
        tokens bound to the live model's context, Send enabled; and the settings of the
        conversation shown (its last turn's: a shared link), baseline included."""
        pg, ui = self.pg, self.ui
        done = pg.state in ("ready", "failed")
        if pg.state != "ready":
            return {ui.banner: pg.banner_markdown(), ui.timer: gr.Timer(active=not done)}
        turns = turns_of(data.get(ui.conversation))
        settings = ui.form.read(data).restored_from(turns[-1] if turns else None)
        choices = pg.baselines()
        baseline = settings.baseline if settings.baseline in choices else pg.default_baseline()
        return {ui.banner: pg.banner_markdown(),
                ui.form.baseline: gr.update(choices=[(LABELS.get(v, v), v) for v in choices],
                                            value=baseline),
                ui.title_b: baseline_title(baseline),
                ui.send: gr.update(interactive=True, value="Send"),
                ui.timer: gr.Timer(active=False),
                **ui.form.write(settings, pg.context_length or 8192)}

    def load(self, data: dict, request: gr.Request) -> dict:
        """?prompt= fills the box; a shared link's conversation shows as it was, else the one
        this browser kept (a reload), with their settings."""
        ui = self.ui
        prompt = (request.query_params.get("prompt", "") or "") if request is not None else ""
        conv = data.get(ui.conversation)
        if not turns_of(conv) and turns_of(data.get(ui.saved)):
            conv = data[ui.saved]
        out = self.refresh({**data, ui.conversation: conv})
        if prompt:
            out[ui.msg] = prompt[:20000]
        return {**out, **dict(zip(ui.views, render(conv, self.pg))), ui.conversation: dumps(conv)}

    def status(self) -> dict:
        """Model and engine status: state (preparing/ready/failed), live model, fallback,
        variants, hardware, active generations, recent log lines."""
        return self.pg.status()
