"""Continuous batching benchmark: B concurrent greedy streams through runtime.Batcher, and the
same load through today's one-loop-per-request path (one Engine.stream_tokens per thread).

    python bench/bench_batch.py MODEL_DIR [--batches 1,2,4,8,16] [--threads 2] [--markdown]

For each B and each path, one fresh subprocess loads the engine, warms up, then starts B
streams at once (PROMPT random token ids each, NEW new tokens, greedy, stop ids off), each
drained by its own thread as server requests are. When the streams are a quarter through,
one more request of the same prompt length (--newcomer-tokens new tokens) arrives: its TTFT
is the "mid-batch TTFT" (B streams running). Reported per row:

- aggregate decode tok/s: sum over the B streams of (tokens - 1) / (last stream's end - first
  stream's first token): what the box delivers while the streams decode;
- per-stream tok/s: the mean of each stream's own (tokens - 1) / (its end - its first token);
- p50 / p95 inter-token time: gaps between consecutive tokens as the streams' threads receive
  them (after each stream's first token);
- TTFT of the B streams (median) and of the newcomer;
- peak RSS (the subprocess's VmHWM) and its growth over the RSS right after warm-up;
- batched rows: the slot pool's reserved KV cache, the mean batch size of the steps, and the
  median time of a decode step of exactly B rows (prefill chunks are runs of their own):
  B / that time is the decode throughput of the batched step itself, apart from the prefills
  that the aggregate above also pays (on the 2B4T model, 2 threads, the other 7 prompts and the
  newcomer's were ~2.5 s of a ~8 s B = 8 row: README.md, "Performance").

The `ratio` column divides the batched aggregate by the loop aggregate at the same B; the
checks line compares with issue 13's targets (aggregate at B=8 >= 4x B=1, per-stream at B=8
>= 40 % of solo, newcomer TTFT with 8 running <= 2x solo TTFT + one step).
Timings on a shared machine are noisy: the script prints `uptime`'s load with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PATHS = ("batched", "loop")


# ---- worker (one B, one path, in its own process) -------------------------------------------

def worker(model_dir: str, path: str, batch: int, threads: int, variant: str, prompt_tokens: int,
           new_tokens: int, newcomer_tokens: int, prefill_chunk: int) -> dict:
    import numpy as np

    from runtime import Engine, GenerationSettings
    from runtime.batcher import Batcher
    from runtime.stats import peak_rss_mb, rss_mb

    engine = Engine(model_dir, variant, threads=threads, prefill_chunk=prefill_chunk)
    rng = np.random.default_rng(0)
    low = 1000 if engine.vocab_size > 2000 else 3  # skip special tokens
    prompts = [rng.integers(low, min(engine.vocab_size, 120000), prompt_tokens).tolist()
               for _ in range(batch + 1)]
    settings = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=[])
    newcomer_settings = GenerationSettings(max_new_tokens=newcomer_tokens, stop_token_ids=[])
    batcher = None
    if path == "batched":
        capacity = -(-(prompt_tokens + max(new_tokens, newcomer_tokens)) // 64) * 64
        batcher = Batcher(engine, slots=batch + 1, capacity=capacity, prefill_chunk=prefill_chunk)
        start = batcher.submit
        step_ms: dict[int, list[float]] = {}  # rows in the decode step -> its durations (ms)
        decode = batcher.pool.decode

        def timed_decode(tokens):
            t = time.perf_counter()
            logits = decode(tokens)
            step_ms.setdefault(len(tokens), []).append(1000 * (time.perf_counter() - t))
            return logits

        batcher.pool.decode = timed_decode
    else:
        start = engine.stream_tokens
    # Warm-up: every slot (or one loop) through a short generation.
    warm = GenerationSettings(max_new_tokens=4, stop_token_ids=[])
    for stream in [start(prompts[i][:16], warm) for i in range(batch + 1 if batcher else 1)]:
        for _ in stream:
            pass
    rss_before = rss_mb()
    if batcher is not None:
        step_ms.clear()

    times: list[list[float]] = [[] for _ in range(batch + 1)]  # receive time of each token
    last_stats = [None] * (batch + 1)
    quarter = threading.Event()

    def drain(i: int, stream) -> None:
        for event in stream:
            if event.token_ids:
                times[i].append(time.perf_counter())
                if i == 0 and len(times[0]) == max(1, new_tokens // 4):
                    quarter.set()
            last_stats[i] = event.stats

    t0 = time.perf_counter()
    workers = [threading.Thread(target=drain, args=(i, start(prompts[i], settings))) for i in range(batch)]
    for w in workers:
        w.start()
    quarter.wait()
    t_newcomer = time.perf_counter()
    newcomer = threading.Thread(target=drain, args=(batch, start(prompts[batch], newcomer_settings)))
    newcomer.start()
    for w in workers + [newcomer]:
        w.join()
    if batcher is not None:
        steps = batcher.steps
        kv_mb = batcher.stats()["kv_cache_mb"]
        batcher.close()

    streams = times[:batch]
    first = min(t[0] for t in streams)
    end = max(t[-1] for t in streams)
    decode_tokens = sum(len(t) - 1 for t in streams)
    gaps = sorted(b - a for t in streams for a, b in zip(t, t[1:]))
    own = [(len(t) - 1) / (t[-1] - t[0]) for t in streams if len(t) > 1]
    row = {
        "path": path, "batch": batch, "threads": engine.threads, "variant": variant,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "aggregate_tok_s": decode_tokens / max(end - first, 1e-9),
        "per_stream_tok_s": statistics.fmean(own) if own else 0.0,
        "p50_gap_ms": 1000 * gaps[len(gaps) // 2] if gaps else 0.0,
        "p95_gap_ms": 1000 * gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))] if gaps else 0.0,
        "ttft_s": statistics.median(t[0] - t0 for t in streams),
        "newcomer_ttft_s": times[batch][0] - t_newcomer,
        "peak_rss_mb": peak_rss_mb(), "rss_growth_mb": peak_rss_mb() - rss_before,
        "wall_s": end - t0,
    }
    if batcher is not None:
        full = step_ms.get(batch, [])
        row.update(kv_cache_mb=kv_mb, steps=steps,
                   mean_batch=statistics.fmean(s.batch_size for s in last_stats[:batch]),
                   step_ms=statistics.median(full) if full else None)
    assert all(len(t) == new_tokens for t in streams), [len(t) for t in streams]
    return row


# ---- driver ----------------------------------------------------------------------------------

def run_worker(args, path: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, args.model_dir, "--worker", path, "--worker-batch", str(batch),
           "--threads", str(args.threads), "--variant", args.variant,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--newcomer-tokens", str(args.newcomer_tokens), "--prefill-chunk", str(args.prefill_chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"worker {path} B={batch} failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    loop = {r["batch"]: r for r in rows if r["path"] == "loop"}
    head = ("| path | B | aggregate tok/s | per-stream tok/s | p50 gap ms | p95 gap ms | TTFT s | "
            "mid-batch TTFT s | peak RSS MB | RSS growth MB | KV MB | mean batch | B-row step ms | ratio vs loop |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        ratio = ""
        if r["path"] == "batched" and r["batch"] in loop:
            ratio = f"{r['aggregate_tok_s'] / loop[r['batch']]['aggregate_tok_s']:.2f}x"
        lines.append(
            f"| {r['path']} | {r['batch']} | {r['aggregate_tok_s']:.1f} | {r['per_stream_tok_s']:.1f} | "
            f"{r['p50_gap_ms']:.1f} | {r['p95_gap_ms']:.1f} | {r['ttft_s']:.3f} | {r['newcomer_ttft_s']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | {r.get('kv_cache_mb', 0):.0f} | "
            f"{r.get('mean_batch', 0):.2f} | {'' if r.get('step_ms') is None else format(r['step_ms'], '.1f')} | "
            f"{ratio} |")
    return "\n".join(lines)


def checks(rows: list[dict]) -> str:
    b = {r["batch"]: r for r in rows if r["path"] == "batched"}
    if 1 not in b or 8 not in b:
        return "checks: need B=1 and B=8 rows"
    solo, eight = b[1], b[8]
    step = eight["p50_gap_ms"] / 1000
    steps = ""
    if solo.get("step_ms") and eight.get("step_ms"):
        steps = f" (decode steps alone: {8 * solo['step_ms'] / eight['step_ms']:.2f}x)"
    return (f"checks (issue 13 targets): aggregate B=8 / B=1 = "
            f"{eight['aggregate_tok_s'] / solo['aggregate_tok_s']:.2f}x (>= 4){steps}; per-stream B=8 / solo = "
            f"{eight['per_stream_tok_s'] / solo['per_stream_tok_s']:.0%} (>= 40%); mid-batch TTFT at B=8 "
            f"{eight['newcomer_ttft_s']:.3f} s vs 2 x solo TTFT + one step = "
            f"{2 * solo['ttft_s'] + step:.3f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--paths", default=",".join(PATHS), help="batched,loop")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", default="ternary")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--newcomer-tokens", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--markdown", action="store_true", help="print the table only as markdown")
    p.add_argument("--json-out", default=None, help="also write all rows to this file")
    p.add_argument("--worker", default=None, choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.newcomer_tokens < 1:
        p.error("--new-tokens must be >= 2, --prompt-tokens and --newcomer-tokens >= 1")

    if args.worker:
        row = worker(args.model_dir, args.worker, args.worker_batch, args.threads, args.variant,
                     args.prompt_tokens, args.new_tokens, args.newcomer_tokens, args.prefill_chunk)
        print(json.dumps(row))
        return 0

    try:
        batches = [int(x) for x in args.batches.split(",") if x.strip()]
        paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    except ValueError:
        p.error("--batches takes integers, e.g. 1,2,4,8,16")
    if not batches or min(batches) < 1 or any(x not in PATHS for x in paths):
        p.error("--batches: integers >= 1; --paths: batched and/or loop")
    load = os.getloadavg()
    rows = []
    for batch in batches:
        for path in paths:
            rows.append(run_worker(args, path, batch))
            if not args.markdown:
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"model {args.model_dir}, variant {args.variant}, {args.threads} threads, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, prefill chunk {args.prefill_chunk}; "
          f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(table(rows))
    print(checks(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
