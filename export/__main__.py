"""Command line: python -m export SOURCE --out DIR [--push-to-hub ORG/NAME [--private]]."""

from __future__ import annotations

import argparse
import signal
import sys

from . import publish
from .errors import ExportError
from .exporter import DEFAULT_VARIANTS, export_checkpoint
from .variants import DEFAULT_LM_HEAD, INT2_BLOCK_SIZE, KV_CACHE_CHOICES, LM_HEAD_CHOICES, VARIANT_NAMES


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a BitNet b1.58 checkpoint (hub id or folder) to an ONNX model folder.")
    parser.add_argument("source", help="hub id (org/name) or local checkpoint folder")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated: {','.join(VARIANT_NAMES)} (default: %(default)s)")
    parser.add_argument("--lm-head", default=DEFAULT_LM_HEAD, choices=LM_HEAD_CHOICES,
                        help="auto (default): int8 for heads of >= 2^24 weights (vocab x hidden), else native; "
                             "int8: ternary reads one int8 table shared with the embedding (bitnet.MatMulI8), "
                             "baselines MatMulNBits 8-bit; "
                             "native/fp16: the checkpoint's precision (exact); nbits8: MatMulNBits 8-bit everywhere")
    parser.add_argument("--int2-block-size", type=int, default=INT2_BLOCK_SIZE,
                        help="MatMulNBits block size of the int2 baseline (default: %(default)s)")
    parser.add_argument("--kv-cache", default="float32", choices=KV_CACHE_CHOICES,
                        help="element type of the ternary variant's KV cache: float16 halves its memory "
                             "(the graph's past/present tensors become float16; baselines keep float32)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                        help="then publish DIR (with its model card) to this hub model repo "
                             "(python -m export.publish; token: HF_TOKEN or `hf auth login`)")
    publish.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.push_to_hub:  # refuse a bad id or a missing token before a long export, not after
        try:
            publish.check_repo_id(args.push_to_hub)
            publish.resolve_token()
        except publish.PublishError as e:
            print(f"export not started: {e}", file=sys.stderr)
            return 1
    # SIGTERM unwinds like Ctrl-C, so the partial output folder is removed on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        export_checkpoint(args.source, args.out, args.variants, lm_head=args.lm_head,
                          overwrite=args.overwrite, revision=args.revision,
                          int2_block_size=args.int2_block_size, kv_cache=args.kv_cache,
                          progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export interrupted; no output written", file=sys.stderr)
        return 130
    if args.push_to_hub:
        try:
            publish.publish_folder(args.out, args.push_to_hub, private=args.private,
                                   progress=lambda msg: print(msg, file=sys.stderr, flush=True))
            print(publish.space_instructions(args.out, args.push_to_hub))
        except publish.PublishError as e:
            print(f"exported to {args.out}, but publish failed: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
