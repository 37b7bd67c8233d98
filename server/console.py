"""What a serving process prints at start: its URLs, and how to get a public link with the
flags of this project (not Gradio's own "set share=True in launch()" advice, which names a
Python argument our command lines do not have)."""

from __future__ import annotations

import os


def print_urls(local_url: str, *, page: bool, api: bool, share_url: str | None = None,
               share_flag: str | None = "--share") -> None:
    base = local_url.rstrip("/")
    if page:
        print(f"[bitnet-onnx] page at {base}/", flush=True)
    if api:
        print(f"[bitnet-onnx] OpenAI-compatible API at {base}/v1", flush=True)
    if share_url:
        print(f"[bitnet-onnx] public link: {share_url}", flush=True)
    elif share_flag and not os.environ.get("SPACE_ID"):
        print(f"[bitnet-onnx] for a public link, run again with {share_flag}", flush=True)
