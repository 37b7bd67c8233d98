"""Shared links that carry the conversation itself: nothing is stored on the server, so a
link lives as long as the page's code, across restarts and new containers.

    https://host/#c=<payload>      payload = base64url(zlib(JSON {"v": 1, "settings", "turns"}))

The payload travels in the URL's fragment, which browsers never send to a server (no server
log holds a visitor's conversation). Long conversations are thinned to fit: the answers'
token timelines are downsampled, and if it is still too long the oldest turns are left out
(`encode` says how many turns it kept).
"""

from __future__ import annotations

import base64
import json
import zlib

from .conversation import thinned, turns_of
from .settings import PageSettings

VERSION = 1
MAX_PAYLOAD_CHARS = 60_000  # well inside every browser's URL limit
MAX_DECODED_BYTES = 8 * 2**20
TIMELINE_POINTS = 40  # per answer, in a link


class BadLink(ValueError):
    pass


def _pack(doc: dict) -> str:
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")


def encode(turns, settings: PageSettings) -> tuple[str, int]:
    """(payload, turns kept): the newest turns that fit in MAX_PAYLOAD_CHARS."""
    turns = [thinned(t, TIMELINE_POINTS) for t in turns_of(turns)]
    keep = len(turns)
    while True:
        payload = _pack({"v": VERSION, "settings": settings.as_dict(), "turns": turns[len(turns) - keep:]})
        if len(payload) <= MAX_PAYLOAD_CHARS or keep == 0:
            return payload, keep
        keep = keep * 3 // 4 if keep > 4 else keep - 1


def decode(payload: str) -> tuple[list, PageSettings | None]:
    """(turns, settings) of a link's payload; BadLink (one line) when it cannot be read."""
    payload = (payload or "").strip()
    if payload.startswith("#"):
        payload = payload[1:]
    if payload.startswith("c="):
        payload = payload[2:]
    try:
        packed = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_DECODED_BYTES)
        if inflater.unconsumed_tail:
            raise BadLink("the link's conversation is too large")
        doc = json.loads(raw)
    except BadLink:
        raise
    except (ValueError, zlib.error) as e:
        raise BadLink(f"the link is damaged or cut short ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise BadLink("the link is from another version of this page")
    settings = doc.get("settings")
    settings = PageSettings.from_values(settings) if isinstance(settings, dict) else None
    return turns_of(doc.get("turns")), settings
