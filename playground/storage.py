"""The key of the conversations kept in the visitor's browser (gr.BrowserState).

Gradio encrypts a BrowserState value with a key it also sends to the page, so the key keeps
nothing confidential: what matters is that it stays the same across restarts, or every
restart (each Space wake-up) would make the stored conversations unreadable. It is
BITNET_BROWSER_SECRET when set (change it to forget every stored conversation), else a fixed
key derived from the Space's id (SPACE_ID) or, outside Spaces, from this app's name.
"""

from __future__ import annotations

import hashlib
import os

STORAGE_KEY = "bitnet-onnx-conversations"


def browser_secret() -> tuple[str, str]:
    """(key, one line saying where it comes from)."""
    secret = os.environ.get("BITNET_BROWSER_SECRET", "").strip()
    if secret:
        return secret, "conversations in browsers: key from BITNET_BROWSER_SECRET"
    origin = os.environ.get("SPACE_ID") or "bitnet-onnx"
    key = hashlib.sha256(f"bitnet-onnx browser storage:{origin}".encode()).hexdigest()[:32]
    return key, (f"conversations in browsers: a fixed key derived from {origin!r} (set "
                 "BITNET_BROWSER_SECRET to choose one)")
