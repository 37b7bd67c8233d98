"""Command line: python -m export SOURCE --out DIR."""

from __future__ import annotations

import argparse
import signal
import sys

from .errors import ExportError
from .exporter import DEFAULT_VARIANTS, export_checkpoint
from .variants import DEFAULT_LM_HEAD, INT2_BLOCK_SIZE, LM_HEAD_CHOICES, VARIANT_NAMES


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
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the partial output folder is removed on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        export_checkpoint(args.source, args.out, args.variants, lm_head=args.lm_head,
                          overwrite=args.overwrite, revision=args.revision,
                          int2_block_size=args.int2_block_size,
                          progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export interrupted; no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
