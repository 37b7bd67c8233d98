"""Fidelity of a float16 KV cache against the float32 one, teacher-forced (a measurement, not a test).

    python bench/kv_cache_fidelity.py F32_DIR F16_DIR [--context 1536] [--steps 64] [--threads 2] [--markdown]

F32_DIR and F16_DIR are exports of one checkpoint, the second with `--kv-cache float16`. Both
prefill the same CONTEXT random token ids, then decode STEPS tokens along the float32 folder's
greedy path (teacher-forced, so one early difference cannot fork the rest). Reported per
decoded position, over all STEPS: max |logit difference| / max |logit| and top-1 agreement,
plus the cache bytes each reserves per token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("float32_dir")
    p.add_argument("float16_dir")
    p.add_argument("--context", type=int, default=1536, help="random prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=64, help="decoded positions compared")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", action="store_true", help="one table row per measurement")
    args = p.parse_args(argv)

    from runtime import Engine

    engines = [Engine(folder, "ternary", threads=args.threads) for folder in (args.float32_dir, args.float16_dir)]
    dtypes = [engine.new_cache(64).dtype for engine in engines]
    if dtypes != [np.float32, np.float16]:
        p.error(f"expected a float32 then a float16 cache, got {[np.dtype(d).name for d in dtypes]}")
    rng = np.random.default_rng(args.seed)
    vocab = min(engine.vocab_size for engine in engines)
    ids = rng.integers(0, vocab, args.context).tolist()
    caches = [engine.new_cache(args.context + args.steps + 1) for engine in engines]
    logits = [engine.prefill(cache, ids).copy() for engine, cache in zip(engines, caches)]
    worst, agree = 0.0, 0
    for _ in range(args.steps):
        exact, half = logits
        worst = max(worst, float(np.abs(exact - half).max() / np.abs(exact).max()))
        agree += int(np.argmax(exact) == np.argmax(half))
        token = int(np.argmax(exact))
        logits = [engine.decode_step(cache, token).copy() for engine, cache in zip(engines, caches)]
    per_token = [cache.nbytes / cache.capacity / 1e6 for cache in caches]
    if args.markdown:
        print(f"| {args.context} | {args.steps} | {worst:.2e} | {agree}/{args.steps} | {per_token[0]:.3f} | {per_token[1]:.3f} |")
    else:
        print(f"context {args.context}, {args.steps} teacher-forced steps: max |diff| / max |logit| {worst:.2e}, "
              f"top-1 agreement {agree}/{args.steps}; cache MB per token {per_token[0]:.3f} (float32) vs "
              f"{per_token[1]:.3f} (float16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
