"""The BitNet b1.58 playground: a Gradio web chat comparing the ternary engine with a stock
ONNX Runtime baseline, side by side.

    python app.py [--model ID|DIR|demo] [--host 0.0.0.0] [--port 7860] [--share] [--threads N]
                  [--no-api] [--batch SLOTS]

Default model: microsoft/bitnet-b1.58-2B-4T, downloaded and exported once into the cache
(BITNET_ONNX_CACHE, else $HF_HOME/bitnet-onnx, else ~/.cache/bitnet-onnx). Without the hub and
without a cached copy it says so and serves a fallback model, with a banner on the page.
The page is served at once; the model is prepared in the background and the page shows the
progress. The same server answers the OpenAI-compatible API at /v1 (server/), sharing one CPU
gate with the page; the ternary engine decodes up to --batch SLOTS streams (page and API
together) in one step (docs/BATCHING.md), the baselines run one at a time. Hugging Face Spaces runs this file as is (docs/SPACES.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from playground.models import DEFAULT_MODEL
from playground.service import Playground
from playground.ui import build_demo, launch_kwargs
from runtime.serving import DEFAULT_QUEUE_SIZE, DEFAULT_SLOTS, concurrency
from server import Limits, attach_api
from server.console import print_urls


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("BITNET_MODEL", DEFAULT_MODEL),
                   help="hub id, checkpoint folder, exported model folder, or 'demo' "
                        "(default: %(default)s)")
    p.add_argument("--variants", default=None,
                   help="variants to export for a new model, e.g. ternary,int2,int4,fp32 "
                        "(default: ternary,int2,int4 for hub models)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per engine (default: the CPUs this process may use, "
                        "cgroup quota included)")
    p.add_argument("--no-api", dest="api", action="store_false",
                   help="do not serve the OpenAI-compatible API (/v1) next to the page")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help="requests that may wait in the queue (default: %(default)s)")
    p.add_argument("--batch", type=int, default=DEFAULT_SLOTS, metavar="SLOTS",
                   help="ternary streams (page and API) decoded together in one step (default: "
                        "%(default)s; 0: one generation at a time through the plain engine)")
    args = p.parse_args(argv)
    if args.batch < 0:
        p.error("--batch must be >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def create_playground(args: argparse.Namespace, limits: Limits | None = None) -> Playground:
    """The playground, holding the one CPU gate that page and API share (the API's limits:
    a page turn waits in the same FIFO queue as API requests; with batching the gate admits
    as many generations as the batcher has slots)."""
    limits = limits or Limits.for_batch(args.batch)
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    pg = Playground(model=args.model, threads=args.threads, variants=variants, batch=args.batch,
                    gate=limits.gate())
    pg.gate_timeout_s = limits.queue_timeout_s
    return pg


def create_demo(pg: Playground, queue_size: int = DEFAULT_QUEUE_SIZE):
    """The queued Blocks. Gradio's queue only bounds how many requests are in flight; the
    order on the CPU is the gate's (so Stop can withdraw a waiting turn): as many turns at
    once as the ternary batcher has slots, one at a time without batching."""
    demo = build_demo(pg)
    demo.queue(default_concurrency_limit=concurrency(pg.batch), max_size=queue_size)
    return demo


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if os.environ.get("SPACE_ID"):
        args.host = "0.0.0.0"  # a Space routes to the container's port 7860
        args.share = False  # ignored on Spaces anyway
    limits = Limits.for_batch(args.batch)
    pg = create_playground(args, limits)
    pg.start(background=True)
    demo = create_demo(pg, args.queue_size)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, quiet=True,
                show_error=True, prevent_thread_lock=True, **launch_kwargs())
    if args.api:
        # pg.api_models: {model id: ternary engine} once ready, None (503 "loading") before.
        attach_api(demo, pg.api_models, limits=limits, gate=pg.gate)
    print_urls(demo.local_url, page=True, api=args.api, share_url=demo.share_url)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
