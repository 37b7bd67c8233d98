"""The lm_head kernels at the 2B4T head shape (vocab 128256 x hidden 2560), decode (M = 1), inside
ONNX Runtime: where the table lives vs the bandwidth it reaches (a benchmark, not a test).

    python bench/bench_heads.py [--threads 1,2] [--rounds 5] [--reps 10] [--kernel auto] [--markdown]

Heads: MatMulF16 (656 MB fp16 table), MatMulI8 (328 MB int8 table + row scales), stock
MatMulNBits bits=8 block 32 (the baselines' head, 369 MB). Each is timed with its table
  - in the model bytes (ORT copies it into its own heap buffer),
  - as external data (ORT memory-maps the file: what an exported model folder does),
  - fed as a graph input from an anonymous mmap advised MADV_HUGEPAGE (2 MiB pages), and
  - the same with MADV_NOHUGEPAGE (4 KiB pages),
so the page size effect is measured with the same kernel and the same thread pool. The bitnet
ops themselves ask for 2 MiB pages in place (MADV_COLLAPSE, weight_memory.cc); `--no-advise` runs with
BITNET_HUGEPAGES=0 to see the tables as ORT leaves them. Rounds are
interleaved with a plain streaming read through ORT's pool (bench_ops.StreamReader) for the
bandwidth reference; medians are printed with the machine's load average.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import custom_ops  # noqa: E402

VOCAB, HIDDEN = 128256, 2560


def anonymous_buffer(nbytes: int, huge: bool) -> np.ndarray:
    """A page-aligned anonymous mapping advised for 2 MiB or 4 KiB pages."""
    m = mmap.mmap(-1, nbytes + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)
    if advice is not None:
        m.madvise(advice)
    buf = np.frombuffer(m, np.uint8)
    offset = (-buf.ctypes.data) % (2 << 20)  # 2 MiB aligned start
    view = buf[offset:offset + nbytes]
    view[:] = 0  # fault the pages in now (the view keeps the mapping alive through .base)
    return view


class Head:
    def __init__(self, name: str, op: str, domain: str, weights: dict, attrs: dict | None = None):
        self.name, self.op, self.domain, self.weights, self.attrs = name, op, domain, weights, attrs or {}
        self.nbytes = sum(a.nbytes for a in weights.values())

    def model(self, as_inputs=()) -> onnx.ModelProto:
        names = list(self.weights)
        node = helper.make_node(self.op, ["X", *names], ["Y"], domain=self.domain, name="lm_head", **self.attrs)
        inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, HIDDEN])]
        inits = []
        for n, a in self.weights.items():
            if n in as_inputs:
                inputs.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)))
            else:
                inits.append(numpy_helper.from_array(a, n))
        graph = helper.make_graph([node], "head", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                                  inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(self.domain, 1)])


def make_heads(rng) -> list[Head]:
    f16 = (rng.standard_normal((VOCAB, HIDDEN), np.float32) * 0.02).astype(np.float16)
    heads = [Head("MatMulF16", "MatMulF16", "bitnet", {"W": f16})]
    codes, scales = custom_ops.quantize_head_table(f16)
    heads.append(Head("MatMulI8", "MatMulI8", "bitnet", {"W": codes, "S": scales}))
    from export.lm_head_int8 import BLOCK_SIZE, quantize_int8_blocks

    b8, s8 = quantize_int8_blocks(f16)
    heads.append(Head("MatMulNBits 8-bit", "MatMulNBits", "com.microsoft", {"B": b8, "S8": s8},
                      {"K": HIDDEN, "N": VOCAB, "bits": 8, "block_size": BLOCK_SIZE, "accuracy_level": 4}))
    return heads


def session(model_or_path, threads: int) -> ort.InferenceSession:
    so = custom_ops.session_options(threads)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model_or_path, so, providers=["CPUExecutionProvider"])


def timer(sess, feed, reps: int) -> float:
    x = {"X": np.random.default_rng(1).standard_normal((1, HIDDEN), np.float32), **feed}
    sess.run(None, x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def placements(head: Head, tmp: Path):
    """(label, make session(threads) -> (session, feed))."""
    big = next(iter(head.weights))  # the table; scales stay initializers

    def in_bytes(threads):
        return session(head.model().SerializeToString(), threads), {}

    path = tmp / f"{head.op}.onnx"
    onnx.save_model(head.model(), str(path), save_as_external_data=True, location=path.name + ".data",
                    size_threshold=1 << 20)

    def external(threads):
        return session(str(path), threads), {}

    def fed(huge):
        table = head.weights[big]
        buf = anonymous_buffer(table.nbytes, huge)
        view = buf.view(table.dtype).reshape(table.shape)
        view[...] = table
        model = head.model(as_inputs=(big,)).SerializeToString()

        def make(threads):
            return session(model, threads), {big: view}
        return make

    found = [("in model bytes (ORT heap)", in_bytes), ("external data (ORT mmap)", external)]
    if head.domain == "bitnet":  # stock MatMulNBits wants its table as a (prepacked) initializer
        found += [("graph input, 2 MiB pages", fed(True)), ("graph input, 4 KiB pages", fed(False))]
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--heads", default="MatMulF16,MatMulI8,MatMulNBits 8-bit", help="comma-separated")
    parser.add_argument("--kernel", default="auto", help="BITNET_KERNEL level to force (e.g. avx2 on an AVX-512 CPU)")
    parser.add_argument("--no-advise", action="store_true", help="BITNET_HUGEPAGES=0: no in-place huge pages")
    args = parser.parse_args(argv)
    os.environ["BITNET_KERNEL"] = args.kernel  # read when the library is registered
    if args.no_advise:
        os.environ["BITNET_HUGEPAGES"] = "0"  # read by the library at its first head call
    threads = [int(t) for t in args.threads.split(",")]
    import bench_ops

    reader = bench_ops.StreamReader()
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for head in [h for h in make_heads(rng) if h.name in args.heads.split(",")]:
            for label, make in placements(head, Path(tmp)):
                for t in threads:
                    sess, feed = make(t)
                    ms, bw = [], []
                    for _ in range(args.rounds):  # interleaved with the stream reference
                        bw.append(reader.bandwidth(t))
                        ms.append(timer(sess, feed, args.reps) * 1e3)
                    del sess
                    m, b = float(np.median(ms)), float(np.median(bw))
                    rows.append((head.name, label, t, m, head.nbytes / m / 1e6, b))
                    print(f"{head.name:18s} {label:28s} threads={t}: {m:8.2f} ms {head.nbytes / m / 1e6:6.1f} GB/s "
                          f"(stream {b:.1f} GB/s)", file=sys.stderr, flush=True)
    load1 = os.getloadavg()[0]
    print(f"kernel level: {custom_ops.resolve_kernel(args.kernel)}; huge-page advice "
          f"{'off' if args.no_advise else 'on'}; load average {load0:.1f} -> {load1:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.markdown:
        print("| head | table placement | threads | ms | GB/s | stream GB/s | % of stream |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, label, t, m, gbs, b in rows:
            print(f"| {name} | {label} | {t} | {m:.2f} | {gbs:.1f} | {b:.1f} | {100 * gbs / b:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
