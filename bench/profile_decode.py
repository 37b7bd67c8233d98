"""Where a decode step's time goes inside ONNX Runtime: per-op time and weight bandwidth.

    python bench/profile_decode.py MODEL_DIR [--threads 2] [--prompt-tokens 128] [--steps 32] [--batch 1]

Opens the engine's own session (runtime.Engine, the ternary variant) with ORT's profiler on,
prefills PROMPT random ids, decodes STEPS tokens greedily, and sums the profiler's node events
of the decode runs per op type: ms per step, share of the run, and for the weight-reading ops
(BitLinear, MatMulF16, MatMulI8, MatMulNBits, MatMul, Gather) the bytes of their initializers
per step and the GB/s that makes. "outside nodes" is the run's wall time minus the sum of its
node times (ORT's executor between nodes, input/output binding); "outside run" is the time a
decode step takes in Python around session.run (sampling, cache bookkeeping). With --batch B,
B rows are prefilled with the same prompt and then decoded together, one [B, 1] run a step
(the batcher's decode step, without its scheduling).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WEIGHT_OPS = {"BitLinear", "MatMulF16", "MatMulI8", "MatMulNBits", "MatMul", "Gather"}


def initializer_bytes_per_op(model_path: str) -> dict[str, int]:
    """Bytes of the initializers each op type reads per decode step (a Gather reads one row)."""
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(model_path, load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        if length is None:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            length = n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        sizes[t.name] = (length, list(t.dims))
    out: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in sizes and node.op_type in WEIGHT_OPS:
                length, dims = sizes[name]
                if node.op_type == "Gather" and i == 0:
                    length = length // max(1, dims[0])  # one row per token
                out[node.op_type] += length
    return dict(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="rows decoded together in each step")
    args = p.parse_args(argv)

    import numpy as np

    import runtime.session as session_module
    from runtime import Engine, GenerationSettings

    plain = session_module.session_options

    def profiled(*a, **kw):
        so = plain(*a, **kw)
        so.enable_profiling = True
        so.profile_file_prefix = str(REPO / "bench" / "out" / "profile")
        return so

    session_module.session_options = profiled
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    engine = Engine(args.model_dir, "ternary", threads=args.threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, min(engine.vocab_size, 120000), args.prompt_tokens).tolist()
    if args.batch == 1:
        steps = 0
        for steps, _ in enumerate(engine.stream_tokens(ids, GenerationSettings(max_new_tokens=args.steps + 1,
                                                                                 stop_token_ids=[])), 1):
            if steps == 1:
                t_decode = time.perf_counter()
        decoded = steps - 1  # the first token came from the prefill
    else:
        cache = engine.new_cache(args.prompt_tokens + args.steps + 1, batch=args.batch)
        tokens = {row: int(np.argmax(cache.prefill(row, ids))) for row in range(args.batch)}
        t_decode = time.perf_counter()
        for _ in range(args.steps):
            logits = cache.decode(tokens)
            tokens = {row: int(np.argmax(logits[row])) for row in tokens}
        decoded = args.steps
    wall_decode = time.perf_counter() - t_decode
    trace = json.loads(Path(engine.session.end_profiling()).read_text())

    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")
    decode_runs = runs[-args.steps:]  # the last STEPS runs are decode steps (the first is prefill)
    per_op: dict[str, float] = defaultdict(float)
    nodes_us = 0.0
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        ts = e["ts"]
        if not any(a <= ts <= b for a, b in decode_runs):
            continue
        per_op[e["args"].get("op_name", "?")] += e["dur"]
        nodes_us += e["dur"]
    run_us = sum(b - a for a, b in decode_runs)
    n = len(decode_runs)
    weights = initializer_bytes_per_op(str(Path(args.model_dir) / "model.onnx"))
    print(f"{args.model_dir}: {n} decode steps of {args.batch} row(s), {args.threads} threads; wall {wall_decode / max(1, decoded) * 1e3:.2f} ms "
          f"per step in Python, session.run {run_us / n / 1e3:.2f} ms, nodes {nodes_us / n / 1e3:.2f} ms")
    print("| op | ms / step | share of run | weight MB / step | GB/s |")
    print("|---|---:|---:|---:|---:|")
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]):
        mb = weights.get(op, 0) / 1e6
        gbs = f"{weights[op] / (us / n * 1e-6) / 1e9:.1f}" if op in weights else ""
        print(f"| {op} | {us / n / 1e3:.2f} | {us / run_us * 100:.1f}% | {mb:.0f} | {gbs} |" if mb else
              f"| {op} | {us / n / 1e3:.2f} | {us / run_us * 100:.1f}% | | |")
    print(f"| outside nodes (executor, binding) | {(run_us - nodes_us) / n / 1e3:.2f} | {(run_us - nodes_us) / run_us * 100:.1f}% | | |")
    py_ms = wall_decode / max(1, decoded) * 1e3 - run_us / n / 1e3
    print(f"| outside run (Python per token) | {py_ms:.2f} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
