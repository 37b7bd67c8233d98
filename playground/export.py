"""A conversation as a file: Markdown to read, JSON to keep and import again.

The JSON holds the messages both engines continued (OpenAI chat format), the settings of
each turn, and every engine's answer with its stats:

    {"format": "bitnet-onnx-conversation", "version": 1, "title": "...", "model": "...",
     "exported": "2026-12-06T23:50:00Z", "messages": [{"role": ..., "content": ...}],
     "turns": [TURN, ...]}
"""

from __future__ import annotations

import json
import time

from .conversation import TERNARY, model_messages, turns_of
from .formatting import LABELS

FORMAT = "bitnet-onnx-conversation"
VERSION = 1
MAX_IMPORT_BYTES = 20 * 2**20


class ImportFailed(ValueError):
    """The file is not a conversation this page exported (the message says why)."""


def to_json(turns, title: str, model: str | None) -> str:
    turns = turns_of(turns)
    system = (turns[-1].get("settings") or {}).get("system", "") if turns else ""
    doc = {"format": FORMAT, "version": VERSION, "title": title, "model": model,
           "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "messages": model_messages(turns, system), "turns": turns}
    return json.dumps(doc, ensure_ascii=False, indent=1)


def _stats_line(answer: dict) -> str:
    s = answer.get("stats") or {}
    if not s.get("new_tokens"):
        return ""
    parts = [f"{s['new_tokens']} tokens", f"TTFT {s.get('ttft_s', 0):.3f} s"]
    if s.get("new_tokens", 0) > 1:
        parts.append(f"decode {s.get('decode_tokens_per_s', 0):.1f} tok/s")
    if s.get("cpu_ms_per_token"):
        parts.append(f"CPU {s['cpu_ms_per_token']:.2f} ms/token")
    if answer.get("finish_reason"):
        parts.append(f"finish: {answer['finish_reason']}")
    return "*" + " · ".join(parts) + "*"


def to_markdown(turns, title: str, model: str | None) -> str:
    turns = turns_of(turns)
    out = [f"# {title}", ""]
    if model:
        out += [f"Model: {model}", ""]
    system = (turns[-1].get("settings") or {}).get("system") if turns else ""  # as in to_json
    if system:
        out += ["**System prompt:**", "", system, ""]
    for n, turn in enumerate(turns, 1):
        settings = turn.get("settings") or {}
        out += [f"## Turn {n}", "", "**You:**", "", turn["user"], ""]
        for variant in [TERNARY] + [v for v in turn["answers"] if v != TERNARY]:
            answer = turn["answers"].get(variant)
            if not answer or answer.get("state") == "skipped":
                continue
            out += [f"**{LABELS.get(variant, variant)}:**", "", answer.get("text") or "*(no text)*", ""]
            line = _stats_line(answer)
            if line:
                out += [line, ""]
        shown = {k: settings[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty",
                                          "frequency_penalty", "presence_penalty",
                                          "max_new_tokens") if k in settings}
        out += [f"<sub>seed {turn.get('seed')} · " + " · ".join(f"{k} {v}" for k, v in shown.items())
                + "</sub>", ""]
    return "\n".join(out).rstrip() + "\n"


def from_json(data: bytes | str) -> tuple[str, list]:
    """(title, turns) of an exported conversation; ImportFailed with the reason otherwise."""
    if len(data) > MAX_IMPORT_BYTES:
        raise ImportFailed(f"the file is larger than {MAX_IMPORT_BYTES // 2**20} MB")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImportFailed(f"the file is not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ImportFailed(f"the file is not a conversation exported from this page (no "
                           f'"format": "{FORMAT}")')
    if doc.get("version") != VERSION:
        raise ImportFailed(f"conversation format version {doc.get('version')!r}; this page reads "
                           f"version {VERSION}")
    turns = turns_of(doc.get("turns"))
    if not turns:
        raise ImportFailed("the file holds no turns")
    return str(doc.get("title") or ""), turns
