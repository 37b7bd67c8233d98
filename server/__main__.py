"""Serve the API alone (plus, with --page, a minimal Gradio page mounted at /):

    python -m server MODEL_DIR [--variant ternary] [--name ID] [--host 127.0.0.1] [--port 8000]
                               [--batch SLOTS (default 4; 0: one request at a time)]
    python -m server MODEL_DIR --ray --replicas 2 [--threads-per-replica 1] [--autoscale MIN:MAX]
        (the same API on Ray Serve, one batched engine per replica: server/ray_serve.py)

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

    from runtime import EngineError
    from runtime.folder import read_config, variant_path
    from runtime.serving import is_batched

    from . import Limits, attach_api, create_api
    from .console import print_urls

    try:  # what can be checked at once (the folder, the variant, the limits): exit 2 now
        variant_path(args.model_dir, args.variant, read_config(args.model_dir))
        limits = Limits.for_batch(args.batch, args.variant)
    except (EngineError, ValueError, KeyError) as e:
        p.exit(2, f"python -m server: error: {e}\n")
    if args.batch and not is_batched(args.variant, args.batch):
        print(f"python -m server: the {args.variant} baseline serves one request at a time "
              "(batching is for the ternary engine)", file=sys.stderr)
    name = args.name or os.path.basename(os.path.normpath(args.model_dir))
    host = f"[{args.host}]" if ":" in args.host else args.host
    loading = _Loading(args, name)  # the model loads while the server answers /health with 503
    if args.page:  # the page beside the API, attached the way app.py attaches it
        import gradio as gr

        with gr.Blocks(title="bitnet-onnx API") as demo:
            gr.Markdown(f"bitnet-onnx API: model `{name}`; POST /v1/chat/completions")
        demo.queue()
        demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True)
        attach_api(demo, loading.models, limits=limits)
        print_urls(demo.local_url, page=True, api=True, share_flag=None)
        loading.start(on_failure=demo.close)
        demo.block_thread()
        return loading.exit_code
    import uvicorn

    print_urls(f"http://{host}:{args.port}", page=False, api=True, share_flag=None)
    server = uvicorn.Server(uvicorn.Config(create_api(loading.models, limits=limits), host=args.host,
                                           port=args.port, log_level="warning"))
    loading.start(on_failure=lambda: setattr(server, "should_exit", True))
    server.run()
    return loading.exit_code


class _Loading:
    """The engine, loaded in a thread: `models()` is None until it is ready (the API answers
    503 "loading" meanwhile, /health included), then {name: engine}. A load that fails prints
    why, stops the server and makes the exit code 2."""

    def __init__(self, args, name: str):
        import threading

        self.args, self.name = args, name
        self.engine = None
        self.exit_code = 0
        self.thread = threading.Thread(target=self._load, name="bitnet-load", daemon=True)
        self._on_failure = None

    def models(self):
        return None if self.engine is None else {self.name: self.engine}

    def start(self, on_failure) -> None:
        self._on_failure = on_failure
        self.thread.start()

    def _load(self) -> None:
        from runtime import Engine, EngineError
        from runtime.serving import serving_engine

        a = self.args
        try:
            self.engine = serving_engine(Engine(a.model_dir, variant=a.variant, threads=a.threads), a.batch)
        except (EngineError, ValueError, KeyError, OSError) as e:
            print(f"python -m server: error: {e}", file=sys.stderr, flush=True)
            self.exit_code = 2
            self._on_failure()


if __name__ == "__main__":
    sys.exit(main())
