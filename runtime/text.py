"""Text side of generation: chat template, input sanitizing, streaming detokenization with
stop strings."""

from __future__ import annotations

import functools
from datetime import datetime

ROLES = ("system", "user", "assistant")


def clean_text(text) -> str:
    """Any str the tokenizer accepts: lone surrogates (which cannot be UTF-8 encoded) become
    U+FFFD; control characters are kept as they are (the tokenizer handles them)."""
    if not isinstance(text, str):
        raise TypeError(f"expected text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def normalize_messages(messages) -> list[dict]:
    """Validate [{"role", "content"}]; content may also be a list of {"type": "text", "text"}
    blocks (Gradio / OpenAI style), which are joined."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, (list, tuple)):
            parts = []
            for block in content:
                if isinstance(block, str):
                    parts.append(block)
                elif isinstance(block, dict) and isinstance(block.get("text"), str):
                    parts.append(block["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be text")
        out.append({"role": role, "content": clean_text(content)})
    return out


@functools.lru_cache(maxsize=8)
def compile_template(source: str):
    """A chat template compiled as transformers does (sandboxed jinja2, trim/lstrip blocks)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas that never split a character and
    never show (a prefix of) a stop string. The deltas always join to `text`.

    The whole generated sequence is decoded at each step (exact for every tokenizer, cheap
    next to a model step); trailing U+FFFD (an unfinished multi-byte character of a
    byte-level tokenizer) is held back until the next token completes it.
    """

    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text handed out so far
        self.text = ""  # the full text (up to a stop string when one was found)
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token_ids) -> str:
        """Add tokens; return the new text that is safe to show."""
        self.ids.extend(token_ids)
        full = self._decode()
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [p for p in (full.find(s, start) for s in self.stop) if p >= 0]
            if hits:
                self.text = full[:min(hits)]
                self.stopped = True
                return self._take(len(self.text))
        self.text = full
        limit = len(full)
        while limit > self.emitted and full[limit - 1] == "\ufffd":
            limit -= 1
        hold = 0  # hold back the longest tail that may still become a stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, limit - self.emitted), hold, -1):
                if full[limit - n:limit] == s[:n]:
                    hold = n
                    break
        return self._take(limit - hold)

    def flush(self) -> str:
        """At the end: everything not shown yet (a real U+FFFD included)."""
        return self._take(len(self.text))

    def _take(self, limit: int) -> str:
        limit = max(limit, self.emitted)
        delta = self.text[self.emitted:limit]
        self.emitted = limit
        return delta
