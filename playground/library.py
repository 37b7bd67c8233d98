"""The visitor's conversations, kept in their browser (a gr.BrowserState): several
conversations, one of them shown. Plain JSON:

    {"current": "a1b2c3d4", "items": [{"id": "a1b2c3d4", "title": "...", "titled": false,
                                       "updated": 1733520000.0, "turns": [TURN, ...]}]}

TURN as in playground/conversation.py. Functions here take a library and return a new one;
a malformed stored value reads as an empty library (`library_of`).
"""

from __future__ import annotations

import secrets
import time

from .conversation import thinned, turns_of

MAX_CONVERSATIONS = 50  # the browser's storage is a few MB; the oldest go first
TIMELINE_POINTS = 60  # per answer (the chart of a conversation shown again)
TITLE_CHARS = 48
UNTITLED = "New conversation"


def library_of(value) -> dict:
    """A stored value as a library: the list of turns an older page kept becomes one
    conversation; anything unreadable, an empty library."""
    if isinstance(value, list) or isinstance(value, str):
        turns = turns_of(value)
        return with_new({"current": None, "items": []}, turns) if turns else empty()
    if not isinstance(value, dict) or not isinstance(value.get("items"), list):
        return empty()
    items = []
    for item in value["items"]:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            items.append({"id": item["id"], "title": str(item.get("title") or UNTITLED),
                          "titled": bool(item.get("titled")),
                          "updated": float(item.get("updated") or 0.0),
                          "turns": turns_of(item.get("turns"))})
    if not items:
        return empty()
    current = value.get("current")
    if current not in {i["id"] for i in items}:
        current = max(items, key=lambda i: i["updated"])["id"]
    return {"current": current, "items": items}


def empty() -> dict:
    return with_new({"current": None, "items": []})


def title_of(turns) -> str:
    turns = turns_of(turns)
    if not turns:
        return UNTITLED
    first = " ".join(turns[0]["user"].split())
    return first[:TITLE_CHARS] + ("…" if len(first) > TITLE_CHARS else "") or UNTITLED


def current(library: dict) -> dict:
    return next(i for i in library["items"] if i["id"] == library["current"])


def with_new(library: dict, turns=(), title: str | None = None) -> dict:
    """The library with a new conversation (shown); the oldest dropped beyond the limit."""
    item = {"id": secrets.token_hex(4), "title": title or title_of(turns), "titled": bool(title),
            "updated": time.time(), "turns": kept(turns)}
    items = sorted(library["items"], key=lambda i: i["updated"], reverse=True)[:MAX_CONVERSATIONS - 1]
    return {"current": item["id"], "items": [item] + items}


def with_turns(library: dict, turns) -> dict:
    """The library with the shown conversation's turns replaced (its title follows its first
    message until the visitor names it)."""
    turns = kept(turns)
    items = []
    for item in library["items"]:
        if item["id"] == library["current"]:
            if item["turns"] == turns:
                return library
            item = dict(item, turns=turns, updated=time.time())
            if not item["titled"]:
                item["title"] = title_of(turns)
        items.append(item)
    return {"current": library["current"], "items": items}


def kept(turns) -> list:
    """Turns as the library keeps them (the timelines thinned: the whole library travels with
    every save)."""
    return [thinned(t, TIMELINE_POINTS) for t in turns_of(list(turns) if not isinstance(turns, str) else turns)]


def switched(library: dict, conversation_id: str) -> dict:
    if conversation_id not in {i["id"] for i in library["items"]}:
        return library
    return {"current": conversation_id, "items": library["items"]}


def renamed(library: dict, title: str) -> dict:
    title = " ".join((title or "").split())[:80]
    items = [dict(i, title=title or title_of(i["turns"]), titled=bool(title))
             if i["id"] == library["current"] else i for i in library["items"]]
    return {"current": library["current"], "items": items}


def deleted(library: dict) -> dict:
    """The library without the shown conversation; the most recent other one is shown (a new
    empty one when none is left)."""
    items = [i for i in library["items"] if i["id"] != library["current"]]
    if not items:
        return empty()
    return {"current": max(items, key=lambda i: i["updated"])["id"], "items": items}


def choices(library: dict) -> list[tuple[str, str]]:
    """(label, id) of each conversation, the most recent first; labels made unique."""
    out, seen = [], {}
    for item in sorted(library["items"], key=lambda i: i["updated"], reverse=True):
        label = item["title"]
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label} ({seen[label]})", item["id"]))
    return out
