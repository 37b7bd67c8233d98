"""What a batch costs per op: BitLinear and MatMulI8 at M = 1..16 rows, one row per forced kernel
level, inside ONNX Runtime, A/B in one process (a benchmark, not a test).

    python bench/bench_rows.py [--ops BitLinear,MatMulI8] [--m 1,2,4,8,16] [--kernels avx512vnni,amx]
        [--threads 1] [--rounds 9] [--clock cpu|wall]

BitLinear runs a model of C independent 2560->6912 nodes (C x 4.4 MB of packed weights > 300 MB,
so weights come from memory, not cache); MatMulI8 one head node of 128256 x 2560 (328 MB, the
2B4T int8 head). Each level gets its own session from the same model bytes; the levels run
interleaved round by round, so drift on a shared machine hits all alike; medians are printed
with the ratio of the first level to each other. `--clock cpu` (default) times the process's
CPU seconds, which other processes' load disturbs less than wall time (both count at 1 thread).
Every level's outputs are checked equal to the first level's in the first round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import custom_ops  # noqa: E402
from bench.bench_ops import _env  # noqa: E402


def model(nodes, initializers, outputs) -> bytes:
    graph = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(custom_ops.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def bitlinear_model(rng, k=2560, n=6912, total_bytes=300e6):
    count = max(1, int(total_bytes // (n * k / 4)))
    nodes, inits, outs = [], [], []
    for c in range(count):
        w = rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k))
        inits += [numpy_helper.from_array(custom_ops.pack_ternary(w), f"W{c}"),
                  numpy_helper.from_array((rng.random(n) + 0.5).astype(np.float32), f"S{c}")]
        nodes.append(helper.make_node("BitLinear", ["X", f"W{c}", f"S{c}"], [f"Y{c}"], domain=custom_ops.DOMAIN, K=k, N=n))
        outs.append(f"Y{c}")
    return model(nodes, inits, outs), k, count * n * k / 4


def head_model(rng, k=2560, n=128256):
    codes = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    node = helper.make_node("MatMulI8", ["X", "W", "S"], ["Y"], domain=custom_ops.DOMAIN)
    inits = [numpy_helper.from_array(codes, "W"), numpy_helper.from_array((rng.random(n) + 0.5).astype(np.float32), "S")]
    return model([node], inits, ["Y"]), k, n * k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="BitLinear,MatMulI8")
    ap.add_argument("--m", default="1,2,4,8,16")
    ap.add_argument("--kernels", default=None, help="levels to compare (default: avx512vnni and the best this CPU has)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = ap.parse_args()
    have = custom_ops.available_kernels()
    levels = args.kernels.split(",") if args.kernels else list(dict.fromkeys(
        [k for k in ("avx512vnni",) if k in have] + [custom_ops.resolve_kernel("auto")]))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rng = np.random.default_rng(0)
    print(f"# {custom_ops.cpu_model()}; load {os.getloadavg()[0]:.2f}; threads {args.threads}; clock {args.clock}; "
          f"levels {', '.join(levels)}")
    for op in args.ops.split(","):
        data, k, weight_bytes = bitlinear_model(rng) if op == "BitLinear" else head_model(rng)
        sessions = {}
        for level in levels:
            with _env("BITNET_KERNEL", level):  # read when the custom-op library is registered
                sessions[level] = ort.InferenceSession(data, custom_ops.session_options(args.threads))
        for m in (int(v) for v in args.m.split(",")):
            x = {"X": rng.standard_normal((m, k)).astype(np.float32)}
            times = {level: [] for level in levels}
            for r in range(args.rounds):
                first = None
                for level in levels:
                    start = clock()
                    out = sessions[level].run(None, x)
                    times[level].append(clock() - start)
                    if r == 0:
                        if first is None:
                            first = out
                        elif not all(np.array_equal(a, b) for a, b in zip(first, out)):
                            raise SystemExit(f"{op} M={m}: {level} differs from {levels[0]}")
            med = {level: float(np.median(t)) for level, t in times.items()}
            cells = "  ".join(f"{level} {med[level] * 1e3:8.2f} ms {weight_bytes / med[level] / 1e9:5.1f} GB/s" for level in levels)
            ratios = " ".join(f"{levels[0]}/{level} {med[levels[0]] / med[level]:.2f}x" for level in levels[1:])
            print(f"{op:9s} M={m:3d}  {cells}  {ratios}", flush=True)
        del sessions


if __name__ == "__main__":
    main()
