"""The page's event handlers (playground/ui.py lays the page out and wires them).

`PageHandlers(pg, layout)` holds the Playground and the components it reads and writes; its
methods are the handlers. The page keeps one thing, the conversation (a hidden JSON value,
playground/conversation.py): both chat panes, the stats lines, the verdict, the charts and
the raw stats are rendered from it (`render`), so a shared link or a reload restores exactly
what was shown. The settings travel as one `PageSettings` (playground/settings.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, fields

import gradio as gr

from . import library as lib
from .conversation import NO_BASELINE, TERNARY, dumps, pane_messages, turns_of
from .export import ImportFailed, from_json, to_json, to_markdown
from .links import BadLink, decode, encode
from .formatting import (LABELS, raw_stats, shown_chart_frames, stats_markdown, summary_line,
                         turn_done)
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
    frequency_penalty: gr.Slider
    presence_penalty: gr.Slider

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
    saved: gr.BrowserState  # the library of conversations (playground/library.py)
    timer: gr.Timer
    form: SettingsForm
    conversations: gr.Dropdown
    title: gr.Textbox
    export_md: gr.DownloadButton
    export_json: gr.DownloadButton
    import_button: gr.UploadButton
    branch: gr.State  # the turn an edit or a pane's retry starts again from
    share_link: gr.Textbox
    opened_link: gr.Textbox  # the fragment of the page's address (a shared link), if any

    def shown_outputs(self) -> list:
        """What showing another conversation writes."""
        return ([self.conversation] + self.views + [self.saved, self.conversations, self.title,
                                                    self.export_md, self.export_json, self.title_b]
                + self.form.components())


MAX_IMPORT_READ = 20 * 2**20 + 1


def turn_index(message_index) -> int | None:
    """The turn of a pane message: each turn shows as two messages (visitor, answer)."""
    if isinstance(message_index, (list, tuple)):
        message_index = message_index[0] if message_index else None
    return message_index // 2 if isinstance(message_index, int) else None


def message_text(value) -> str:
    """An edited message's text (a string, or Gradio's list of content blocks)."""
    if isinstance(value, list):
        return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in value)
    return value if isinstance(value, str) else ""


def slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:40] or "conversation"


def _write_replacing(path: str, text: str) -> None:
    """Write a file whole or not at all (a download in flight never sees half of it)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def settings_of(*values) -> PageSettings:
    """The settings from the panel's values given in PageSettings' field order (the order of
    SettingsForm, and of the /chat and /retry parameters)."""
    return PageSettings.from_values(dict(zip(PageSettings.names(), values)))


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
    # the charts show the latest finished comparison (kept while the next turn streams)
    speed, timeline = shown_chart_frames(next((t for t in reversed(turns) if turn_done(t)), None))
    raw = json.dumps(raw_stats(last, pg.hardware or None), indent=1, ensure_ascii=False)
    return (pane_messages(turns, TERNARY), pane_messages(turns, "baseline"), stats_t, stats_b,
            summary_line(last, pg.time_limit_s), speed, timeline, raw)


class PageHandlers:
    def __init__(self, pg, layout: Layout):
        self.pg, self.ui = pg, layout

    # -- a turn ---------------------------------------------------------------------------------
    def chat(self, message, conversation_, system_prompt, baseline, max_new_tokens, temperature,
             top_p, top_k, repetition_penalty, seed, frequency_penalty=0.0, presence_penalty=0.0,
             request: gr.Request = None):
        """Send a message; stream the ternary engine's answer, then the baseline's."""
        settings = settings_of(system_prompt, baseline, max_new_tokens, temperature, top_p, top_k,
                               repetition_penalty, seed, frequency_penalty, presence_penalty)
        yield from self._run(message, conversation_, settings, session_of(request))

    def retry(self, conversation_, system_prompt, baseline, max_new_tokens, temperature, top_p,
              top_k, repetition_penalty, seed, frequency_penalty=0.0, presence_penalty=0.0,
              request: gr.Request = None):
        """Answer the last user message again (both panes), replacing that turn."""
        turns = turns_of(conversation_)
        if not turns:
            yield (gr.skip(),) + render(turns, self.pg) + (dumps(turns),)
            return
        settings = settings_of(system_prompt, baseline, max_new_tokens, temperature, top_p, top_k,
                               repetition_penalty, seed, frequency_penalty, presence_penalty)
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
                for turns, final in states:
                    views = render(turns, pg)
                    if not final and not any(turn_done(t) for t in turns):
                        # a branch with no finished turn yet (an edited first message): the
                        # charts stay as they are until it ends, rather than going blank
                        views = views[:5] + (gr.skip(), gr.skip()) + views[7:]
                    yield (("" if first and not keep_box else gr.skip()),) + views + (dumps(turns),)
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

    def take_edit(self, edit: gr.EditData) -> dict:
        """A visitor's message edited in a pane (or sent again unchanged): which turn, what text
        (run by run_branch once Send is locked)."""
        return {"turn": turn_index(edit.index), "text": message_text(edit.value)}

    def take_retry(self, retry: gr.RetryData) -> dict:
        """The pane's own retry button (on the last answer): that turn, its own text."""
        return {"turn": turn_index(retry.index), "text": None}

    def run_branch(self, data: dict, request: gr.Request):
        """The turns after the edited or retried one are dropped and both engines answer the
        new branch."""
        turns = turns_of(data.get(self.ui.conversation))
        branch = data.get(self.ui.branch) or {}
        index = branch.get("turn")
        if not isinstance(index, int) or index >= len(turns):
            yield (gr.skip(),) + render(turns, self.pg) + (dumps(turns),)
            return
        text = branch.get("text")
        yield from self._run(turns[index]["user"] if text is None else text, turns[:index],
                             self.ui.form.read(data), session_of(request), keep_box=True)

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

    def unlock_and_save(self, conv, saved):
        """Send enabled again; the conversation saved in the browser's library."""
        library = lib.with_turns(lib.library_of(saved), conv)
        return {self.ui.send: gr.update(interactive=self.pg.state == "ready", value="Send"),
                **self._library_outputs(library)}

    # -- the conversations kept in the browser ---------------------------------------------------------
    def _library_outputs(self, library: dict) -> dict:
        item = lib.current(library)
        md, js = self._export_files(item)
        return {self.ui.saved: library,
                self.ui.conversations: gr.update(choices=lib.choices(library), value=item["id"]),
                self.ui.title: item["title"], self.ui.export_md: md, self.ui.export_json: js}

    def _export_files(self, item: dict) -> tuple:
        """(Markdown file, JSON file) of a conversation, or (None, None) while it is empty.

        Every turn, rename and switch rewrites them, so each conversation keeps one pair in its
        own folder, replaced in place (the previous title's pair removed) rather than a new pair
        each time."""
        if not item["turns"]:
            return None, None
        model = self.pg.resolved.model_id if self.pg.resolved else None
        # the id comes from the browser: hashed, it is a safe folder name
        folder = os.path.join(tempfile.gettempdir(), "bitnet-onnx-exports",
                              hashlib.sha1(item["id"].encode()).hexdigest()[:16])
        os.makedirs(folder, exist_ok=True)
        files = []
        for ext, text in (("md", to_markdown(item["turns"], item["title"], model)),
                          ("json", to_json(item["turns"], item["title"], model))):
            path = os.path.join(folder, f"{slug(item['title'])}.{ext}")
            _write_replacing(path, text)
            files.append(path)
        for name in os.listdir(folder):
            stale = os.path.join(folder, name)
            if stale not in files and name.endswith((".md", ".json")):
                with contextlib.suppress(OSError):
                    os.remove(stale)
        return tuple(files)

    def _show(self, library: dict, data: dict) -> dict:
        """Show the library's current conversation, with the settings of its last turn."""
        turns = lib.current(library)["turns"]
        out = {self.ui.conversation: dumps(turns), **dict(zip(self.ui.views, render(turns, self.pg))),
               **self._library_outputs(library)}
        if turns and self.pg.state == "ready":
            settings = self.ui.form.read(data).restored_from(turns[-1])
            out.update(self._settings_outputs(settings))
        return out

    def new_conversation(self, data: dict) -> dict:
        return self._show(lib.with_new(lib.library_of(data.get(self.ui.saved))), data)

    def switch_conversation(self, data: dict) -> dict:
        library = lib.switched(lib.library_of(data.get(self.ui.saved)), data.get(self.ui.conversations))
        return self._show(library, data)

    def rename_conversation(self, saved, title: str) -> dict:
        return self._library_outputs(lib.renamed(lib.library_of(saved), title))

    def delete_conversation(self, data: dict) -> dict:
        return self._show(lib.deleted(lib.library_of(data.get(self.ui.saved))), data)

    def import_conversation(self, data: dict) -> dict:
        """A JSON file exported from this page, as a new conversation."""
        upload = data.get(self.ui.import_button)
        path = getattr(upload, "name", upload)  # Gradio passes a path (or a file wrapper)
        try:
            with open(path, "rb") as f:
                title, turns = from_json(f.read(MAX_IMPORT_READ))
        except (ImportFailed, OSError, TypeError) as e:
            log.warning("import refused: %s", str(e).splitlines()[0])
            gr.Warning(f"Could not import that file: {e}", title="Import")
            return {self.ui.conversation: gr.skip()}  # the page as it was
        library = lib.with_new(lib.library_of(data.get(self.ui.saved)), turns, title=title or None)
        return self._show(library, data)

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
        return {ui.banner: pg.banner_markdown(), ui.send: gr.update(interactive=True, value="Send"),
                ui.timer: gr.Timer(active=False), **self._settings_outputs(settings)}

    def _settings_outputs(self, settings: PageSettings) -> dict:
        """The settings panel and the baseline menu showing `settings` (baselines this model
        has; max new tokens bound to its context)."""
        pg, ui = self.pg, self.ui
        choices = pg.baselines()
        baseline = settings.baseline if settings.baseline in choices else pg.default_baseline()
        return {ui.form.baseline: gr.update(choices=[(LABELS.get(v, v), v) for v in choices],
                                            value=baseline),
                ui.title_b: baseline_title(baseline),
                **ui.form.write(settings, pg.context_length or 8192)}

    def load(self, data: dict, request: gr.Request) -> dict:
        """?prompt= fills the box; a shared link's conversation shows as it was, else the one
        this browser kept (a reload), with their settings."""
        ui = self.ui
        prompt = (request.query_params.get("prompt", "") or "") if request is not None else ""
        library = lib.library_of(data.get(ui.saved))
        linked = turns_of(data.get(ui.conversation))  # a shared link's conversation
        if linked and linked != lib.current(library)["turns"]:
            library = lib.with_new(library, linked)
        turns = lib.current(library)["turns"]
        out = self.refresh({**data, ui.conversation: turns})
        if prompt:
            out[ui.msg] = prompt[:20000]
        return {**out, **dict(zip(ui.views, render(turns, self.pg))), ui.conversation: dumps(turns),
                **self._library_outputs(library)}

    # -- shared links ------------------------------------------------------------------------------------
    def share(self, data: dict) -> dict:
        """The link's fragment (#c=...): the conversation and the settings, compressed (the page
        prefixes its own address and copies it)."""
        turns = turns_of(data.get(self.ui.conversation))
        payload, kept = encode(turns, self.ui.form.read(data))
        if kept < len(turns):
            gr.Info(f"The conversation is long: the link holds its last {kept} of {len(turns)} turns.")
        return {self.ui.share_link: gr.update(value="#c=" + payload, visible=True)}

    def open_link(self, data: dict) -> dict:
        """A shared link's conversation becomes one of this browser's conversations (the one
        with the same turns if it is there already) and is shown with the link's settings."""
        fragment = data.get(self.ui.opened_link) or ""
        if not fragment.startswith("#c="):
            return {self.ui.conversation: gr.skip()}
        try:
            turns, settings = decode(fragment)
        except BadLink as e:
            gr.Warning(f"This link could not be opened: {e}.", title="Link")
            return {self.ui.conversation: gr.skip()}
        library = lib.library_of(data.get(self.ui.saved))
        same = next((i["id"] for i in library["items"] if i["turns"] == turns), None)
        library = lib.switched(library, same) if same else lib.with_new(library, turns)
        out = self._show(library, data)
        if settings is not None and self.pg.state == "ready":
            out.update(self._settings_outputs(settings))
        return out

    def status(self) -> dict:
        """Model and engine status: state (preparing/ready/failed), live model, fallback,
        variants, hardware, active generations, recent log lines."""
        return self.pg.status()
