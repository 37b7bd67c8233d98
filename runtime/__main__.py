"""Command line: python -m runtime DIR [--prompt TEXT] [options].

With --prompt: one generation streamed to stdout (stats on stderr), or with --json one JSON
object {text, token_ids, finish_reason, stats} on stdout. Without --prompt: an interactive
multi-turn chat on stdin (Ctrl-C stops an answer; Ctrl-C at the prompt or EOF exits).
Errors: one line on stderr, exit status 1 (2 for bad arguments), no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading

from .errors import first_line
from .folder import VARIANTS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime",
                                description="Generate text with an exported BitNet ONNX model folder.")
    p.add_argument("model_dir", metavar="DIR", help="model folder written by python -m export")
    p.add_argument("--prompt", help="the prompt; without it, an interactive chat on stdin")
    p.add_argument("--variant", default="ternary", choices=VARIANTS)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", nargs="+", default=[], metavar="S", help="stop strings")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the CPUs this process may use)")
    p.add_argument("--system", default=None, help="system prompt (chat mode)")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is raw text")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer")
    p.add_argument("--truncate", action="store_true",
                   help="chat: drop the oldest turns when the history outgrows the context")
    return p


def stats_line(stats) -> str:
    return (f"[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new | TTFT {stats.ttft_s:.3f} s | "
            f"prefill {stats.prefill_tokens_per_s:.1f} tok/s | decode {stats.decode_tokens_per_s:.1f} tok/s | "
            f"RSS {stats.rss_mb:.0f} MB (peak {stats.peak_rss_mb:.0f}) | {stats.variant}, {stats.threads} threads]")


def _answer(engine, settings, prompt, messages, as_json: bool, cancel) -> str:
    """One generation printed to stdout; returns its text."""
    parts, ids, last = [], [], None
    for event in engine.stream(prompt=prompt, messages=messages, settings=settings, cancel=cancel):
        parts.append(event.text)
        ids.extend(event.token_ids)
        last = event
        if not as_json and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    text = "".join(parts)
    if as_json:
        print(json.dumps({"text": text, "token_ids": ids, "finish_reason": last.finish_reason,
                          "stats": last.stats.as_dict()}, ensure_ascii=False), flush=True)
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        note = "" if last.finish_reason == "stop" else f" ({last.finish_reason})"
        print(stats_line(last.stats) + note, file=sys.stderr, flush=True)
    return text


def _interactive(engine, settings, args) -> int:
    history = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    tty = sys.stdin.isatty()
    if tty:
        print(f"chat with {engine.model_dir} ({engine.variant}); Ctrl-C stops an answer, "
              "Ctrl-D or Ctrl-C at the prompt exits", file=sys.stderr)
    while True:
        try:
            if tty:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if not line:  # EOF
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        cancel = threading.Event()
        try:
            if args.raw:
                _answer(engine, settings, line, None, args.json, cancel)
                continue
            turn = history + [{"role": "user", "content": line}]
            text = _answer(engine, settings, None, turn, args.json, cancel)
            history = turn + [{"role": "assistant", "content": text}]
        except KeyboardInterrupt:
            # The generator was interrupted between tokens; it released its cache on close.
            print("\n[stopped]", file=sys.stderr, flush=True)
        except ValueError as e:  # overlong prompt and the like: report, keep chatting
            print(f"error: {e}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from runtime import Engine, GenerationSettings

        settings = GenerationSettings(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
            stop=list(args.stop), truncate=args.truncate)
        settings.validate()
        engine = Engine(args.model_dir, variant=args.variant, threads=args.threads)
        if args.prompt is None:
            return _interactive(engine, settings, args)
        if args.raw:
            prompt, messages = args.prompt, None
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                [{"role": "user", "content": args.prompt}]
            prompt = None
        _answer(engine, settings, prompt, messages, args.json, None)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # one line, no traceback
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
