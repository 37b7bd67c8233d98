"""Per-op benchmark: BitLinear vs every stock ONNX Runtime way to run the same ternary weights.

At the BitNet b1.58 2B4T projection shapes (K->N: 2560->2560, 2560->640, 2560->6912,
6912->2560), for M = 1 (decode) and M = 128 (prefill), with 1 and 2 intra-op threads, it
times, on the same random ternary weights (~1/3 zeros):

- ``BitLinear``             our custom op (bitnet domain), default kernel (``--kernels``: one
                            row per forced kernel via BITNET_KERNEL)
- ``int2 b128``             com.microsoft MatMulNBits bits=2, block 128, accuracy_level 4
                            (MLAS's int8 2-bit kernel; 128 is the largest block it has one for:
                            at 256 ORT falls back to dequantize + SGEMM, ~100x slower)
- ``int2 b256 LUT``         MatMulNBits bits=2, block 256 (the largest ORT accepts for 2-bit),
                            session config ``mlas.use_lut_gemm`` = "1" (T-MAC style LUT kernel)
- ``int4 b32``              MatMulNBits bits=4, block 32, accuracy_level 4
- ``fp32 MatMul``           ONNX MatMul with float32 weights
- ``... +Q``                the same stock op behind the per-row int8 activation quantization
                            subgraph the exported baselines use (Abs, ReduceMax, Max, Div, Mul,
                            Round, Clip, Div): what BitLinear does inside, done with stock ops.

Weights do not sit in cache between calls: each configuration is one ONNX model of C
independent nodes with their own weights (all fed the same X, all outputs returned), with
C chosen so one model run reads more than 2x the last-level cache of weight bytes. Time per
layer call = time per run / C. Configurations of one (shape, threads) group are run
interleaved, round by round, so machine noise hits all of them alike; the medians are
reported. With IO binding (inputs and outputs preallocated), no copies happen per run.

It also measures the machine's plain streaming-read bandwidth (ORT ReduceSum over a 256 MiB
float tensor, run by ORT's intra-op thread pool) with 1 and 2 threads, and prints BitLinear's
fraction of it at M = 1.

Usage: python bench/bench_ops.py [--shapes 2560x2560,...] [--threads 1,2] [--m 1,128]
       [--repeat N] [--quick] [--kernels] [--no-quant] [--markdown]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from export.external_data import ExternalDataWriter, save_model  # noqa: E402
from export.graph import GraphBuilder, Projection  # noqa: E402
from export.matmulnbits import make_matmulnbits, weight_bytes as nbits_weight_bytes  # noqa: E402
from export.variants import Fp32Variant, NBitsVariant, TernaryVariant  # noqa: E402
from runtime.session import open_session  # noqa: E402

SHAPES = [(2560, 2560), (2560, 640), (2560, 6912), (6912, 2560)]
SHAPE_NAMES = {(2560, 2560): "q/o_proj", (2560, 640): "k/v_proj", (2560, 6912): "gate/up_proj",
               (6912, 2560): "down_proj"}
OPSET = 17  # ReduceMax keeps `axes` as an attribute
LUT_KEY = "mlas.use_lut_gemm"  # onnxruntime/core/session/onnxruntime_session_options_config_keys.h


# ---- machine facts ------------------------------------------------------------------------

def llc_bytes() -> int:
    """Size of the largest cache level cpu0 sees (sysfs), default 32 MiB."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return best or 32 << 20


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


# ---- graph building ------------------------------------------------------------------------

def weight_copies(base: np.ndarray, copies: int):
    """Distinct ternary weights per copy (the base rolled along K): same statistics."""
    k = base.shape[1]
    for i in range(copies):
        yield base if i == 0 else np.roll(base, (i * 997) % k, axis=1)


@dataclass
class Config:
    name: str
    kind: str                  # bitlinear | int2 | int4 | fp32
    block: int = 0
    lut: bool = False
    quant: bool = False        # stock op preceded by the int8 activation quantization subgraph
    kernel: str | None = None  # forced BITNET_KERNEL
    stock: bool = True
    copies: int = 0
    bytes_per_call: int = 0
    m128: bool = True          # run at M = 128 (the reference kernel is too slow for that)


def variant_for(cfg: Config):
    """The exporter's own variant object for a configuration: the benchmark's layers are built
    by the code that builds the exported models (the "+Q" rows are the baselines' projections,
    activation quantization included; the rows without it call the variant's stock matmul)."""
    if cfg.kind == "bitlinear":
        return TernaryVariant()
    if cfg.kind in ("int2", "int4"):
        return NBitsVariant(2 if cfg.kind == "int2" else 4, cfg.block, 4)
    if cfg.kind == "fp32":
        return Fp32Variant()
    raise ValueError(cfg.kind)


def add_layer(b: GraphBuilder, cfg: Config, i: int, w: np.ndarray, scale: float) -> str:
    """Copy i of the configuration's layer on its own input X{i}; returns its output name.
    (Own inputs, all bound to the same values: ORT cannot merge the copies' identical
    quantization subgraphs, with the session options the engine uses.)"""
    variant, x = variant_for(cfg), f"X{i}"
    if cfg.kind == "bitlinear" or cfg.quant:
        return variant.linear(b, f"layer{i}", x, Projection(w, np.full(w.shape[0], scale, np.float32)))
    return variant.matmul(b, f"layer{i}", x, w)  # the stock op alone: y = x @ w^T


def bytes_per_call(cfg: Config, n: int, k: int, custom_ops) -> int:
    if cfg.kind == "bitlinear":
        return int(custom_ops.pack_ternary(np.zeros((n, k), np.int8)).nbytes) + 4
    if cfg.kind == "int2":
        return nbits_weight_bytes(n, k, 2, cfg.block)
    if cfg.kind == "int4":
        return nbits_weight_bytes(n, k, 4, cfg.block)
    return n * k * 4


def build_model(cfg: Config, base: np.ndarray, scale: float, folder: Path) -> Path:
    """Writes the configuration's model to folder/model.onnx with its weights in
    model.onnx.data, page aligned, as the exporter writes them: ONNX Runtime then holds the
    weights the way it holds an exported model's (memory-mapped external data)."""
    n, k = base.shape
    folder.mkdir(parents=True, exist_ok=True)
    writer = ExternalDataWriter(str(folder), "model.onnx.data")
    b = GraphBuilder(writer)
    outs = [add_layer(b, cfg, i, w, scale) for i, w in enumerate(weight_copies(base, cfg.copies))]
    writer.close()
    graph = helper.make_graph(
        b.nodes, f"bench_{cfg.kind}",
        [helper.make_tensor_value_info(f"X{i}", TensorProto.FLOAT, ["M", k]) for i in range(cfg.copies)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["M", n]) for o in outs], initializer=b.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    if cfg.kind == "bitlinear":
        opsets.append(helper.make_opsetid(TernaryVariant.extra_domains[0], 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path = folder / "model.onnx"
    save_model(model, str(path))
    return path


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def make_session(model: Path, threads: int, cfg: Config) -> ort.InferenceSession:
    """The session the engine would open (runtime.session.open_session), plus
    session.force_spinning_stop: without it the idle pool threads of the other sessions in this
    process keep spinning and steal the second core."""
    config = {"session.force_spinning_stop": "1"}
    if cfg.lut:
        config[LUT_KEY] = "1"
    with _env("BITNET_KERNEL", cfg.kernel):  # read when the custom-op library is registered
        return open_session(model, threads=threads, custom_ops=cfg.kind == "bitlinear", config=config)


# ---- timing ---------------------------------------------------------------------------------

class Runner:
    """One session bound to preallocated input and outputs for one M."""

    def __init__(self, sess: ort.InferenceSession, x: np.ndarray, n: int):
        self.sess = sess
        self.binding = sess.io_binding()
        self.x = ort.OrtValue.ortvalue_from_numpy(x)
        for i in sess.get_inputs():
            self.binding.bind_ortvalue_input(i.name, self.x)
        self.outs = []
        for o in sess.get_outputs():
            v = ort.OrtValue.ortvalue_from_shape_and_type([x.shape[0], n], np.float32)
            self.outs.append(v)
            self.binding.bind_ortvalue_output(o.name, v)

    def run(self) -> float:
        t0 = time.perf_counter()
        self.sess.run_with_iobinding(self.binding)
        return time.perf_counter() - t0

    def first_output(self) -> np.ndarray:
        return self.outs[0].numpy()


STREAM_BYTES = 256 << 20
# Models are written here (weights as external data, as exported) and removed after each shape.
WORK_DIR = Path(tempfile.mkdtemp(prefix="bench_ops_"))
atexit.register(shutil.rmtree, WORK_DIR, True)
STREAM_NAME = "stream read (ReduceSum)"


class StreamReader:
    """Plain streaming read through ORT's thread pool: ReduceSum over a [256, L] float32 tensor
    of 256 MiB (reduce over L, MLAS vectorized, rows split over the intra-op threads)."""

    def __init__(self):
        rows = 256
        cols = STREAM_BYTES // 4 // rows
        self.x = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
        g = helper.make_graph([helper.make_node("ReduceSum", ["X"], ["Y"], keepdims=0, axes=[1])], "bw",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [rows, cols])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows])])
        self.model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)]).SerializeToString()
        self.xv = ort.OrtValue.ortvalue_from_numpy(self.x)

    def runner(self, threads: int):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.force_spinning_stop", "1")
        sess = ort.InferenceSession(self.model, so, providers=["CPUExecutionProvider"])
        b = sess.io_binding()
        b.bind_ortvalue_input("X", self.xv)
        b.bind_output("Y")

        class _R:
            def run(self_inner):
                t0 = time.perf_counter()
                sess.run_with_iobinding(b)
                return time.perf_counter() - t0
        return _R()

    def bandwidth(self, threads: int, rounds: int = 7) -> float:
        r = self.runner(threads)
        r.run()
        return STREAM_BYTES / float(np.median([r.run() for _ in range(rounds)])) / 1e9


def lut_check(custom_ops=None) -> str:
    """Show that the LUT session option really switches kernels: block 256 with accuracy 0 has
    no native 2-bit kernel, so without the option ORT dequantizes to fp32 and runs SGEMM."""
    k = n = 2560
    w = np.random.default_rng(1).integers(-1, 2, (n, k)).astype(np.int8)
    nodes, inits = make_matmulnbits("mm", "X", "Y", w, 2, 256, 0, 1.0)
    g = helper.make_graph(nodes, "lut", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], initializer=inits)
    model = WORK_DIR / "lut_check.onnx"
    save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET),
                                                   helper.make_opsetid("com.microsoft", 1)]), str(model))
    x = np.random.default_rng(2).standard_normal((1, k)).astype(np.float32)
    res = {}
    for lut in (False, True):
        sess = make_session(model, 1, Config("", "int2", 256, lut=lut))
        r = Runner(sess, x, n)
        r.run()
        res[lut] = (min(r.run() for _ in range(5)), r.first_output().copy())
    ref = x @ w.T.astype(np.float32)
    err = float(np.abs(res[True][1] - ref).max() / np.abs(ref).max())
    return (f"LUT check ({LUT_KEY}): int2 b256 accuracy_level 0, 2560x2560, M=1: "
            f"{res[False][0] * 1e6:.0f} us without the option (dequantize + SGEMM fallback), "
            f"{res[True][0] * 1e6:.0f} us with it (LUT kernel); LUT rel. max error {err:.1e}")


@dataclass
class Result:
    k: int
    n: int
    m: int
    threads: int
    cfg: Config
    us: float
    gbs: float
    samples: list = field(default_factory=list)


def run_group(k, n, threads, ms, configs, models, custom_ops, rounds_m1, rounds_m128, log,
              reference=None, stream=None):
    rng = np.random.default_rng(1000 + k + n)
    sessions = {}
    for cfg in configs:
        t0 = time.perf_counter()
        sessions[cfg.name] = make_session(models[cfg.name], threads, cfg)
        log(f"    session {cfg.name:<22} C={cfg.copies:<4} {time.perf_counter() - t0:5.1f}s")
    results = []
    for m in ms:
        active = [c for c in configs if m == 1 or c.m128]
        x = rng.standard_normal((m, k)).astype(np.float32)
        runners = {c.name: Runner(sessions[c.name], x, n) for c in active}
        if m == 1 and stream is not None:
            # The streaming read runs in the same rounds, so BitLinear's fraction of it compares
            # numbers taken under the same machine load.
            sc = Config(STREAM_NAME, "stream", stock=False, copies=1, bytes_per_call=STREAM_BYTES)
            active = active + [sc]
            runners[sc.name] = stream.runner(threads)
        for r in runners.values():  # warm-up: allocations, thread pools, page faults
            r.run()
        if reference is not None:  # x @ (w * scale)^T; the stock ops alone compute x @ w^T
            w_ref, scale = reference
            unscaled = x @ w_ref.T
            by_name = {c.name: c for c in active}
            for name, r in runners.items():
                if name == STREAM_NAME:
                    continue
                c = by_name[name]
                ref = unscaled * np.float32(scale) if c.kind == "bitlinear" or c.quant else unscaled
                err = float(np.abs(r.first_output() - ref).max() / max(np.abs(ref).max(), 1e-30))
                if not err < 0.05:
                    log(f"WARNING: {name} at M={m} differs from x @ w^T: relative max error {err:.3g}")
        rounds = rounds_m1 if m == 1 else rounds_m128
        inner = 2 if m == 1 else 1  # at M=1 the first run after a switch absorbs the switch
        samples = {c.name: [] for c in active}
        for rnd in range(rounds):
            order = active[rnd % len(active):] + active[:rnd % len(active)]
            for c in order:
                for _ in range(inner):
                    t = runners[c.name].run()
                samples[c.name].append(t / c.copies)
        for c in active:
            us = float(np.median(samples[c.name])) * 1e6
            results.append(Result(k, n, m, threads, c, us, c.bytes_per_call / us / 1e3, samples[c.name]))
        del runners
    del sessions
    gc.collect()
    return results


# ---- reporting ------------------------------------------------------------------------------

def ratio(r: Result, ref: Result) -> float:
    """Median over rounds of r's time / ref's time in the same round: robust to load drifting
    between rounds (the two were timed back to back in every round)."""
    a, b = np.asarray(r.samples), np.asarray(ref.samples)
    if len(a) != len(b) or not len(a):
        return r.us / ref.us
    return float(np.median(a / b))


def summarize(results):
    """Per (shape, M, threads): BitLinear vs fastest stock, vs fp32, fraction of bandwidth."""
    out = []
    groups = {}
    for r in results:
        groups.setdefault((r.k, r.n, r.m, r.threads), []).append(r)
    for key, rs in groups.items():
        bl = next((r for r in rs if r.cfg.kind == "bitlinear" and r.cfg.kernel is None), None)
        stock_alone = [r for r in rs if r.cfg.stock and not r.cfg.quant]
        fastest = min(stock_alone, key=lambda r: r.us) if stock_alone else None
        fp32 = next((r for r in rs if r.cfg.kind == "fp32" and not r.cfg.quant), None)
        st = next((r for r in rs if r.cfg.kind == "stream"), None)
        out.append(dict(key=key, bl=bl, fastest=fastest, fp32=fp32, stream=st,
                        bw_frac=(1.0 / ratio(bl, st) * bl.cfg.bytes_per_call / st.cfg.bytes_per_call)
                        if (bl and st) else None))
    return out


def _gops(r) -> str:
    """Multiply-adds x 2 per second, in 1e9: the compute rate (what matters at M = 128)."""
    if r.cfg.kind == "stream":
        return "-"
    return f"{2 * r.m * r.n * r.k / r.us / 1e3:.1f}"


def print_groups(results):
    cur = None
    for r in results:
        key = (r.k, r.n, r.m, r.threads)
        if key != cur:
            cur = key
            print(f"\n{r.k}->{r.n} ({SHAPE_NAMES.get((r.k, r.n), '')})  M={r.m}  threads={r.threads}")
            print(f"  {'config':<24}{'us/call':>10}{'best':>10}{'GB/s':>8}{'GOP/s':>8}{'copies':>8}"
                  f"{'x BitLinear':>13}")
            bl = next((x for x in results if (x.k, x.n, x.m, x.threads) == key
                       and x.cfg.kind == "bitlinear" and x.cfg.kernel is None), None)
        rt = f"{ratio(r, bl):12.2f}x" if bl and r.cfg.kind != "stream" else f"{'-':>13}"
        best = min(r.samples) * 1e6
        print(f"  {r.cfg.name:<24}{r.us:10.1f}{best:10.1f}{r.gbs:8.1f}{_gops(r):>8}{r.cfg.copies:8d}{rt}")
    sys.stdout.flush()


def print_summary(summary):
    print("\nSummary (speedup = stock time / BitLinear time, median of per-round ratios; "
          "fastest stock = fastest op alone by median time):")
    for s in summary:
        k, n, m, t = s["key"]
        bl, f, fp = s["bl"], s["fastest"], s["fp32"]
        if not bl:
            continue
        line = f"  {k}->{n} M={m:<3} t={t}: BitLinear {bl.us:8.1f} us"
        if f:
            line += f" | vs fastest stock ({f.cfg.name}) {ratio(f, bl):5.2f}x"
        if fp:
            line += f" | vs fp32 {ratio(fp, bl):5.1f}x"
        if s["bw_frac"] is not None:
            line += f" | {100 * s['bw_frac']:.0f}% of stream BW"
        print(line)


def print_markdown(results, summary, header):
    print(header)
    print()
    print("| K->N | M | threads | config | us/call | weight GB/s | GOP/s | time / BitLinear |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in results:
        key = (r.k, r.n, r.m, r.threads)
        bl = next((x for x in results if (x.k, x.n, x.m, x.threads) == key
                   and x.cfg.kind == "bitlinear" and x.cfg.kernel is None), None)
        rt = f"{ratio(r, bl):.2f}x" if bl and r.cfg.kind != "stream" else "-"
        name = f"**{r.cfg.name}**" if r is bl else r.cfg.name
        print(f"| {r.k}->{r.n} | {r.m} | {r.threads} | {name} | {r.us:.1f} | {r.gbs:.1f} | {_gops(r)} | {rt} |")
    if any(s["bl"] for s in summary):
        print()
        print("| K->N | M | threads | BitLinear us | fastest stock (op alone) | its us | BitLinear speedup "
              "| vs fp32 | % of stream BW |")
        print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
        for s in summary:
            k, n, m, t = s["key"]
            bl, f, fp = s["bl"], s["fastest"], s["fp32"]
            if not bl:
                continue
            frac = f"{100 * s['bw_frac']:.0f}%" if s["bw_frac"] is not None else "-"
            print(f"| {k}->{n} | {m} | {t} | {bl.us:.1f} | {f.cfg.name if f else '-'} | "
                  f"{f.us if f else float('nan'):.1f} | {ratio(f, bl) if f else float('nan'):.2f}x | "
                  f"{ratio(fp, bl) if fp else float('nan'):.1f}x | {frac} |")


# ---- main -----------------------------------------------------------------------------------

def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _shapes(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        k, _, n = part.strip().lower().partition("x")
        out.append((int(k), int(n)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=_shapes, default=None,
                    help="comma-separated KxN (default: the four 2B4T shapes)")
    ap.add_argument("--threads", type=_ints, default=[1, 2], help="intra-op thread counts (default 1,2)")
    ap.add_argument("--m", type=_ints, default=[1, 128], help="rows of X (default 1,128)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="interleaved rounds at M=1 (default 10); M>1 uses a third, at least 3")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2560x2560 only, few rounds, no +Q rows")
    ap.add_argument("--kernels", action="store_true", help="add a BitLinear row per forced BITNET_KERNEL")
    ap.add_argument("--no-quant", action="store_true", help="skip the stock '+Q' rows")
    ap.add_argument("--no-bitlinear", action="store_true", help="stock configurations only")
    ap.add_argument("--markdown", action="store_true", help="also print the tables in Markdown")
    ap.add_argument("--cache-factor", type=float, default=2.5,
                    help="weight bytes per model run, in units of the last-level cache (default 2.5)")
    args = ap.parse_args(argv)

    shapes = args.shapes or ([(2560, 2560)] if args.quick else SHAPES)
    repeat = args.repeat or (4 if args.quick else 10)
    rounds_m128 = max(3, repeat // 3) if not args.quick else 2
    with_quant = not (args.no_quant or args.quick)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    custom_ops = None
    if not args.no_bitlinear:
        try:
            import custom_ops  # noqa: PLC0415 - sessions register custom_ops.library_path() (open_session)

            custom_ops.library_path()
        except Exception as e:  # noqa: BLE001 - report and go on with the stock rows
            log(f"BitLinear unavailable, stock rows only: {type(e).__name__}: {e}")

    llc = llc_bytes()
    target = args.cache_factor * llc
    command = "python bench/bench_ops.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu_model()} "
              f"({os.cpu_count()} CPUs, LLC {llc >> 20} MiB), onnxruntime {ort.__version__}, "
              f"command `{command.strip()}`")
    print(header)
    print(f"load average at start: {_loadavg()} (other processes on this machine skew every number;"
          " ratios inside one group are measured interleaved)")

    # Streaming bandwidth and the LUT sanity check.
    stream = StreamReader()
    for t in sorted(set(args.threads)):
        print(f"stream read bandwidth (ORT ReduceSum over 256 MiB fp32), {t} thread(s), alone: "
              f"{stream.bandwidth(t):.1f} GB/s (also measured inside every M=1 group below)")
    print(lut_check())

    results = []
    for k, n in shapes:
        configs: list[Config] = []
        if custom_ops is not None:
            configs.append(Config("BitLinear", "bitlinear", stock=False))
            if args.kernels:
                try:
                    have = custom_ops.available_kernels()
                except AttributeError:
                    flags = cpu_flags()
                    have = ["reference", "avx2"] if "avx2" in flags else ["reference"]
                    if {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
                        have.append("avx512vnni")
                for kern in have:
                    # The reference kernel is scalar: far too slow to run at M = 128 here.
                    configs.append(Config(f"BitLinear [{kern}]", "bitlinear", kernel=kern, stock=False,
                                          m128=kern != "reference"))
        stock = [Config("int2 b128", "int2", 128), Config("int2 b256 LUT", "int2", 256, lut=True),
                 Config("int4 b32", "int4", 32), Config("fp32 MatMul", "fp32")]
        configs += stock
        if with_quant:
            # +Q rows at M = 1 only: at M = 128 the quantization subgraph is noise next to the GEMM.
            configs += [Config(c.name + " +Q", c.kind, c.block, lut=c.lut, quant=True, m128=False)
                        for c in stock]
        base = np.random.default_rng(k * 7 + n).choice(np.array([-1, 0, 1], np.int8), size=(n, k))
        scale = 0.75
        models = {}
        cache_models = {}
        log(f"{k}->{n}: building models")
        for c in configs:
            c.bytes_per_call = bytes_per_call(c, n, k, custom_ops)
            c.copies = max(2, math.ceil(target / c.bytes_per_call))
            # Same weights, same graph: share one serialized model between configurations that
            # differ only by session options (LUT, forced kernel).
            mkey = (c.kind, c.block, c.quant)
            if mkey not in cache_models:
                t0 = time.perf_counter()
                folder = WORK_DIR / f"{k}x{n}-{c.kind}-b{c.block}-{'q' if c.quant else 'op'}"
                cache_models[mkey] = build_model(c, base, scale, folder)
                size = (folder / "model.onnx.data").stat().st_size
                log(f"    model {c.name:<24} C={c.copies:<4} {size >> 20} MiB {time.perf_counter() - t0:5.1f}s")
            models[c.name] = cache_models[mkey]
        for t in args.threads:
            log(f"{k}->{n} threads={t}: measuring")
            group = run_group(k, n, t, args.m, configs, models, custom_ops, repeat, rounds_m128, log,
                              reference=(base.astype(np.float32), scale), stream=stream)
            print_groups(group)
            results += group
        del models, cache_models
        gc.collect()
        for folder in WORK_DIR.glob(f"{k}x{n}-*"):
            shutil.rmtree(folder, ignore_errors=True)

    results.sort(key=lambda r: (SHAPES.index((r.k, r.n)) if (r.k, r.n) in SHAPES else 99, r.k, r.n,
                                r.m, r.threads))
    print(f"\nload average at end: {_loadavg()}")
    summary = summarize(results)
    print_summary(summary)
    if args.markdown:
        print()
        print_markdown(results, summary, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
