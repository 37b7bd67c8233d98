"""End-to-end benchmark of the runtime engine: prefill, decode and memory for every variant.

On a model folder exported from the 2B4T-shaped checkpoint (random ternary weights, the exact
shapes of microsoft/bitnet-b1.58-2B-4T):

    python bench/make_2b4t_checkpoint.py bench/out/ckpt-2b4t
    python -m export bench/out/ckpt-2b4t --out /work/models/2b4t-random --variants ternary,int2,int4,fp32 --int2-block-size 256
    python -m export bench/out/ckpt-2b4t --out /work/models/2b4t-int2b128 --variants int2
    python bench/bench_e2e.py /work/models/2b4t-random --int2-dir /work/models/2b4t-int2b128 [--markdown]

For each configuration (ternary; int2 = MatMulNBits 2-bit with the native kernel, taken from
--int2-dir when given: MLAS has a native 2-bit kernel only up to block 128, the exporter's
default; int2-lut = the main folder's int2 with session config mlas.use_lut_gemm=1, block 256
in the commands above as in the published tables; int4; fp32) and each thread
count, one fresh subprocess loads the engine, warms up, then prefills PROMPT random token ids
in one run and decodes NEW tokens greedily (stop ids off), through runtime.Engine exactly as
the app runs it. Configurations are interleaved (round by round, thread count by thread
count) so machine noise hits all alike; with --rounds > 1 the medians are shown.
Peak RSS is the subprocess's VmHWM (the whole process: weights, KV cache, arenas).

CPU time: the machine may be shared; the worker also reports its process CPU time per decoded
token and the share of its `threads` cores it got (CPU time / (wall time x threads)). A share
well below 1 at 1 thread means the run waited for a core: the wall-clock numbers are then
slower than the engine is.

Bandwidth floor: weight bytes a decode step reads (every initializer except tables that are
only gathered from, i.e. the embedding when the lm_head does not share it, and the RoPE
caches) / the streaming-read bandwidth that bench/bench_ops.py measures (ORT ReduceSum over
256 MiB) with the same thread count, measured right before each configuration's run (the
load of a shared machine drifts), median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIGS = {
    # name: (variant, session config, folder option)
    "ternary": ("ternary", {}, None),
    "int2": ("int2", {}, "int2_dir"),
    "int2-lut": ("int2", {"mlas.use_lut_gemm": "1"}, None),
    "int4": ("int4", {}, None),
    "fp32": ("fp32", {}, None),
}


# ---- worker (one configuration in its own process) -----------------------------------------

def worker(model_dir: str, config: str, threads: int, prompt_tokens: int, new_tokens: int) -> dict:
    import numpy as np

    from runtime import Engine, GenerationSettings
    from runtime.stats import peak_rss_mb

    variant, session_config, _ = CONFIGS[config]
    t0 = time.perf_counter()
    engine = Engine(model_dir, variant, threads=threads, session_config=session_config,
                    prefill_chunk=max(256, prompt_tokens))
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    low = 1000 if engine.vocab_size > 2000 else 3  # skip special tokens
    ids = rng.integers(low, min(engine.vocab_size, 120000), prompt_tokens).tolist()
    # Warm-up: a short prefill and a few decode steps (first-run allocations, page faults).
    for _ in engine.stream_tokens(ids[:16], GenerationSettings(max_new_tokens=4, stop_token_ids=[])):
        pass
    settings = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=[])
    last, cpu0, wall0 = None, None, None
    for i, last in enumerate(engine.stream_tokens(ids, settings)):
        if i == 0:  # first token out: decode starts
            cpu0, wall0 = time.process_time(), time.perf_counter()
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    s = last.stats
    assert s.new_tokens == new_tokens, s
    return {
        "config": config, "variant": variant, "threads": threads, "load_s": load_s,
        "prefill_tokens_per_s": s.prefill_tokens_per_s, "prefill_s": s.prefill_s,
        "decode_tokens_per_s": s.decode_tokens_per_s, "decode_ms_per_token": 1000.0 / s.decode_tokens_per_s,
        "ttft_s": s.ttft_s, "rss_mb": s.rss_mb,
        "peak_rss_mb": peak_rss_mb(),  # VmHWM: ru_maxrss would include the parent's (fork + exec)
        "kv_cache_mb": s.kv_cache_mb, "model_file_mb": engine.model_file_bytes / 2**20,
        # CPU time of the process per decoded token, and the share of `threads` cores it got:
        # on a busy machine wall time is inflated by waiting for a core; at 1 thread the CPU
        # time is close to what the step costs alone (at 2 threads it includes ORT's spinning).
        "decode_cpu_ms_per_token": cpu_s * 1000.0 / max(1, new_tokens - 1),
        "decode_cpu_share": cpu_s / max(wall_s * threads, 1e-9),
    }


# ---- weight bytes read per decode step -----------------------------------------------------

def weight_bytes_per_token(model_path: str) -> int:
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, i))
    total = 0
    for init in model.graph.initializer:
        uses = consumers.get(init.name, [])
        if uses and all(op == "Gather" and i == 0 for op, i in uses):
            continue  # embedding table: one row per token
        if uses and all(op == "GroupQueryAttention" and i in (7, 8) for op, i in uses):
            continue  # RoPE cos/sin caches: one row per token
        total += _tensor_bytes(init)
    return total


def _tensor_bytes(t) -> int:
    import numpy as np
    from onnx import helper

    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def measure_bandwidth(threads: int) -> float:
    """GB/s of a plain streaming read through ORT's thread pool (bench/bench_ops.py)."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_ops

    if hasattr(bench_ops, "StreamReader"):
        reader = getattr(measure_bandwidth, "_reader", None) or bench_ops.StreamReader()
        measure_bandwidth._reader = reader
        return reader.bandwidth(threads)
    return bench_ops.stream_bandwidth(threads)


# ---- driver ----------------------------------------------------------------------------------

def run_worker(model_dir, config, threads, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), model_dir, "--worker", config,
           "--worker-threads", str(threads), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"config": config, "threads": threads, "error": tail}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _median(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else float("nan")


def summarize(results, bandwidth, bytes_per_token, configs, thread_list):
    table = []
    for t in thread_list:
        base = [r for r in results if r["config"] == "ternary" and r["threads"] == t and "error" not in r]
        base_dec, base_pre = _median(base, "decode_tokens_per_s"), _median(base, "prefill_tokens_per_s")
        for c in configs:
            rows = [r for r in results if r["config"] == c and r["threads"] == t]
            ok = [r for r in rows if "error" not in r]
            if not ok:
                table.append({"config": c, "threads": t, "error": rows[0]["error"] if rows else "not run"})
                continue
            dec, pre = _median(ok, "decode_tokens_per_s"), _median(ok, "prefill_tokens_per_s")
            bw = _median(ok, "bandwidth_gbs")  # measured just before each of this row's runs
            floor_ms = bytes_per_token[c] / (bw * 1e9) * 1e3
            ms = 1000.0 / dec
            table.append({
                "config": c, "threads": t, "prefill_tps": pre, "decode_tps": dec, "decode_ms": ms,
                "ttft_s": _median(ok, "ttft_s"), "peak_rss_mb": _median(ok, "peak_rss_mb"),
                "cpu_ms": _median(ok, "decode_cpu_ms_per_token"), "cpu_share": _median(ok, "decode_cpu_share"),
                "load_s": _median(ok, "load_s"),
                "weight_mb_per_token": bytes_per_token[c] / 2**20, "floor_ms": floor_ms,
                "x_floor": ms / floor_ms, "bandwidth_gbs": bw,
                "ternary_decode_speedup": base_dec / dec, "ternary_prefill_speedup": base_pre / pre,
                "n": len(ok),
            })
    return table


def print_text(table):
    print(f"{'config':<9} {'thr':>3} {'prefill t/s':>11} {'decode t/s':>10} {'ms/tok':>7} "
          f"{'floor ms':>8} {'x floor':>7} {'TTFT s':>7} {'peak RSS MB':>11} {'tern. dec x':>11} {'tern. pre x':>11} "
          f"{'CPU ms/tok':>10} {'CPU share':>9}")
    for r in table:
        if "error" in r:
            print(f"{r['config']:<9} {r['threads']:>3} error: {r['error']}")
            continue
        print(f"{r['config']:<9} {r['threads']:>3} {r['prefill_tps']:>11.1f} {r['decode_tps']:>10.2f} "
              f"{r['decode_ms']:>7.1f} {r['floor_ms']:>8.1f} {r['x_floor']:>7.2f} {r['ttft_s']:>7.2f} "
              f"{r['peak_rss_mb']:>11.0f} {r['ternary_decode_speedup']:>11.2f} {r['ternary_prefill_speedup']:>11.2f} "
              f"{r['cpu_ms']:>10.1f} {r['cpu_share']:>9.2f}")


def print_markdown(table):
    print("| variant | threads | prefill tok/s | decode tok/s | ms/token | floor ms | x floor | "
          "TTFT s | peak RSS MB | ternary decode speed-up | ternary prefill speed-up | decode CPU ms/token | CPU share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        if "error" in r:
            print(f"| {r['config']} | {r['threads']} | error: {r['error']} | | | | | | | | | | |")
            continue
        print(f"| {r['config']} | {r['threads']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | "
              f"{r['decode_ms']:.1f} | {r['floor_ms']:.1f} | {r['x_floor']:.2f} | {r['ttft_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['ternary_decode_speedup']:.2f}x | {r['ternary_prefill_speedup']:.2f}x | "
              f"{r['cpu_ms']:.1f} | {r['cpu_share']:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--int2-dir", default=None,
                   help="folder whose int2 variant is used for the native int2 row (e.g. block 128)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--json-out", default=None, help="also write all results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.model_dir, args.worker, args.worker_threads,
                                args.prompt_tokens, args.new_tokens)))
        return 0

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {','.join(CONFIGS)}")
    thread_list = [int(t) for t in args.threads.split(",")]
    from runtime.errors import EngineError, VariantNotFoundError
    from runtime.folder import read_config, variant_path

    try:
        cfg = read_config(args.model_dir)
        dirs, bytes_per_token = {}, {}
        for c in configs:
            variant, _, dir_opt = CONFIGS[c]
            d = getattr(args, dir_opt) if dir_opt and getattr(args, dir_opt) else args.model_dir
            dirs[c] = d
            bytes_per_token[c] = weight_bytes_per_token(variant_path(d, variant))
    except (EngineError, VariantNotFoundError) as e:
        p.error(str(e))

    import onnxruntime

    print(f"# bench_e2e {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.processor() or platform.machine()} "
          f"| {os.cpu_count()} CPUs | onnxruntime {onnxruntime.__version__} | model {args.model_dir} "
          f"({cfg.get('num_layers')} layers, hidden {cfg.get('hidden_size')}, vocab {cfg.get('vocab_size')}) "
          f"| prompt {args.prompt_tokens} tokens, decode {args.new_tokens} tokens | load average {os.getloadavg()[0]:.1f}",
          flush=True)
    for c in configs:
        print(f"#   {c}: {dirs[c]} ({CONFIGS[c][0]}, session config {CONFIGS[c][1] or '-'}), "
              f"{bytes_per_token[c] / 2**20:.0f} MiB of weights read per decode step", flush=True)

    results, bandwidth = [], {}
    for rnd in range(args.rounds):
        for t in thread_list:
            bandwidth.setdefault(t, []).append(measure_bandwidth(t))
            print(f"# round {rnd + 1}, {t} thread(s): stream read {bandwidth[t][-1]:.1f} GB/s", flush=True)
            for c in configs:
                bw_now = measure_bandwidth(t)  # right before the row: the machine's load drifts
                bandwidth[t].append(bw_now)
                r = run_worker(dirs[c], c, t, args)
                r["bandwidth_gbs"] = bw_now
                results.append(r)
                if "error" in r:
                    print(f"#   {c:<9} error: {r['error']}", flush=True)
                else:
                    print(f"#   {c:<9} prefill {r['prefill_tokens_per_s']:8.1f} tok/s  decode "
                          f"{r['decode_tokens_per_s']:7.2f} tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                          f"load {r['load_s']:.1f} s  decode CPU {r['decode_cpu_ms_per_token']:.1f} ms/token "
                          f"(share {r['decode_cpu_share']:.2f})  load average {os.getloadavg()[0]:.1f}", flush=True)
    table = summarize(results, bandwidth, bytes_per_token, configs, thread_list)
    print()
    print_text(table)
    if args.markdown:
        print()
        print_markdown(table)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"results": results, "bandwidth": bandwidth, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
