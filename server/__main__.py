"""Serve the API alone (plus, with --page, a minimal Gradio page mounted at /):

    python -m server MODEL_DIR [--variant ternary] [--name ID] [--host 127.0.0.1] [--port 8000]
                               [--batch SLOTS]

The playground (app.py) mounts its own page the same way; this is for API-only hosting,
benchmarks and tests. Limits come from BITNET_API_* variables, the key from BITNET_API_KEY.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="exported model folder (python -m export ... --out DIR)")
    p.add_argument("--variant", default="ternary", help="engine variant (default: %(default)s)")
    p.add_argument("--name", default=None, help="model id in the API (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--page", action="store_true", help="mount a minimal Gradio page at /")
    p.add_argument("--batch", type=int, default=0, metavar="SLOTS",
                   help="decode up to SLOTS requests together in one step (continuous batching, "
                        "docs/BATCHING.md); also the API's concurrency (default: off, one at a time)")
    args = p.parse_args(argv)
    if args.batch < 0:
        p.error("--batch must be >= 0")

    from runtime import Engine
    from runtime.errors import EngineError

    from . import Limits, attach_api, create_api
    from .console import print_urls

    try:
        engine = Engine(args.model_dir, variant=args.variant, threads=args.threads)
        limits = Limits.from_env()
    except (EngineError, ValueError, KeyError) as e:
        p.exit(2, f"python -m server: error: {e}\n")
    if args.batch:  # one shared decode step; the gate admits as many requests as there are slots
        from runtime.batcher import BatchedEngine

        engine = BatchedEngine(engine, slots=args.batch)
        limits = Limits.from_env(concurrency=args.batch)
    name = args.name or os.path.basename(os.path.normpath(args.model_dir))
    host = f"[{args.host}]" if ":" in args.host else args.host
    if args.page:  # the page beside the API, attached the way app.py attaches it
        import gradio as gr

        with gr.Blocks(title="bitnet-onnx API") as demo:
            gr.Markdown(f"bitnet-onnx API: model `{name}`; POST /v1/chat/completions")
        demo.queue()
        demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True)
        attach_api(demo, {name: engine}, limits=limits)
        print_urls(demo.local_url, page=True, api=True, share_flag=None)
        demo.block_thread()
        return 0
    import uvicorn

    print_urls(f"http://{host}:{args.port}", page=False, api=True, share_flag=None)
    uvicorn.run(create_api({name: engine}, limits=limits), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
