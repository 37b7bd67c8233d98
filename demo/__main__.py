"""python -m demo train|pack|sample: the Shakespeare BitNet b1.58 demo model.

  python -m demo train                  # ternary QAT run with the fixed seed (2000 steps, 1 thread),
                                        # then pack it into models/shakespeare-bitnet
  python -m demo train --variant float  # the float baseline, same data/steps/seed (run it beside
                                        # the ternary one: one core each)
  python -m demo pack                   # re-pack build/demo/ternary into the model folder
  python -m demo sample "To be, or not to be"   # chat with the shipped checkpoint (transformers)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "models", "shakespeare-bitnet")


def _log(line: str) -> None:
    print(time.strftime("%H:%M:%S"), line, flush=True)


def main(argv=None) -> int:
    from .train import TrainArgs

    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train (ternary QAT by default) and pack the checkpoint")
    for f in fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, type(f.default))
            tr.add_argument(flag, type=typ, default=f.default)
    tr.add_argument("--model-dir", default=MODEL_DIR, help="where to pack the ternary model")
    tr.add_argument("--no-pack", action="store_true", help="train only")
    pk = sub.add_parser("pack", help="pack build/demo/ternary/checkpoint.pt into the model folder")
    pk.add_argument("--build", default=None)
    pk.add_argument("--model-dir", default=MODEL_DIR)
    sub.add_parser("eval", help="full validation loss of build/demo/{ternary,float}")
    cd = sub.add_parser("card", help="write the model card (README.md) with samples")
    cd.add_argument("--model-dir", default=MODEL_DIR)
    cd.add_argument("--no-export", dest="export", action="store_false",
                    help="skip the ONNX export parity check and runtime timing")
    sm = sub.add_parser("sample", help="generate replies with transformers from the packed model")
    sm.add_argument("prompt", nargs="+")
    sm.add_argument("--model-dir", default=MODEL_DIR)
    sm.add_argument("--greedy", action="store_true")
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--max-new-tokens", type=int, default=120)
    args = ap.parse_args(argv)

    if args.cmd == "train":
        from .train import train

        targs = TrainArgs(**{f.name: getattr(args, f.name) for f in fields(TrainArgs)})
        if targs.variant not in ("ternary", "float"):
            ap.error("--variant must be ternary or float")
        t0 = time.time()
        metrics = train(targs, log=_log)
        _log(f"training wall time {metrics['train_wall_s'] / 60:.1f} min "
             f"({metrics['mean_tok_s']:.0f} tokens/s mean); total {(time.time() - t0) / 60:.1f} min")
        if targs.variant == "ternary" and not args.no_pack:
            from .pack import write_checkpoint
            from .train import load_checkpoint

            model = load_checkpoint(os.path.join(targs.out, "ternary", "checkpoint.pt"))
            write_checkpoint(model, os.path.join(targs.out, "tokenizer"), args.model_dir)
            _log(f"packed into {args.model_dir}")
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("args", "config")}, indent=2))
        return 0

    if args.cmd == "pack":
        from .pack import write_checkpoint
        from .train import BUILD, load_checkpoint

        build = args.build or BUILD
        model = load_checkpoint(os.path.join(build, "ternary", "checkpoint.pt"))
        write_checkpoint(model, os.path.join(build, "tokenizer"), args.model_dir)
        _log(f"packed into {args.model_dir}")
        return 0

    if args.cmd == "eval":
        from .card import full_eval

        full_eval(log=_log)
        return 0

    if args.cmd == "card":
        from .card import export_report, write_card

        if args.export:
            export_report(args.model_dir, log=_log)
        write_card(args.model_dir, log=_log)
        _log(f"wrote {os.path.join(args.model_dir, 'README.md')}")
        return 0

    if args.cmd == "sample":
        from .sample import chat

        print(chat(args.model_dir, " ".join(args.prompt), greedy=args.greedy, seed=args.seed,
                   max_new_tokens=args.max_new_tokens))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
