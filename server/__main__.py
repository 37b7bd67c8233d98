"""Serve the API alone (plus, with --page, a minimal Gradio page mounted at /):

    python -m server MODEL_DIR [--variant ternary] [--name ID] [--host 127.0.0.1] [--port 8000]
                               [--batch SLOTS (default 4; 0: one request at a time)]
    python -m server MODEL_DIR --ray --replicas 2 [--threads-per-replica 1] [--autoscale MIN:MAX]
        (the same API on Ray Serve, one engine per replica: server/ray_serve.py)

The playground (app.py) mounts its own page the same way; this is for API-only hosting,
benchmarks and tests. Limits come from BITNET_API_* variables, the key from BITNET_API_KEY.
"""

from __future__ import annotations

import argparse
import os
import sys

from runtime.serving import DEFAULT_SLOTS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="exported model folder (python -m export ... --out DIR)")
    p.add_argument("--variant", default="ternary", help="engine variant (default: %(default)s)")
    p.add_argument("--name", default=None, help="model id in the API (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--page", action="store_true", help="mount a minimal Gradio page at /")
    p.add_argument("--batch", type=int, default=DEFAULT_SLOTS, metavar="SLOTS",
                   help="decode up to SLOTS requests together in one step (continuous batching, "
                        "docs/BATCHING.md); also the API's concurrency (default: %(default)s; "
                        "0: one request at a time through the plain engine)")
    # Ray Serve: one engine per replica (server/ray_serve.py; pip install -r requirements-ray.txt)
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve (RAY_ADDRESS: an existing cluster)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (default: %(default)s)")
    p.add_argument("--threads-per-replica", type=int, default=1, help="with --ray (default: %(default)s)")
    p.add_argument("--autoscale", metavar="MIN:MAX", help="with --ray: autoscale between MIN and MAX replicas")
    args = p.parse_args(argv)
    if args.ray:
        from .ray_serve import main as ray_main

        return ray_main(args)
    if args.batch < 0:
        p.error("--batch must be >= 0")

    from runtime import Engine, EngineError
    from runtime.serving import is_batched, serving_engine

    from . import Limits, attach_api, create_api
    from .console import print_urls

    try:
        engine = Engine(args.model_dir, variant=args.variant, threads=args.threads)
        limits = Limits.for_batch(args.batch, args.variant)
    except (EngineError, ValueError, KeyError) as e:
        p.exit(2, f"python -m server: error: {e}\n")
    if args.batch and not is_batched(args.variant, args.batch):
        print(f"python -m server: the {args.variant} baseline serves one request at a time "
              "(batching is for the ternary engine)", file=sys.stderr)
    engine = serving_engine(engine, args.batch)
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
