"""Peer benchmark: our engine against llama.cpp's and ik_llama.cpp's ternary types on the same
checkpoint, one run.

    python bench/bench_peers.py CHECKPOINT --ours DIR[@VARIANT][=LABEL] [--ours DIR2=LABEL2 ...]
        [--ik-source DIR] [--depth 1536] [--depth-threads 2]
        [--work bench/out/peers] [--threads 1,2] [--rounds 3] [--markdown-out FILE]

CHECKPOINT is a BitNet b1.58 checkpoint folder in the 2B4T format (bench/make_2b4t_checkpoint.py
writes one, seed 0); each --ours DIR is a folder `python -m export CHECKPOINT --out DIR` wrote
from it (LABEL names the row, e.g. "default" or "fp16 head"). Steps, each cached under --work
(and bench/out/llama for the build), so a second run only times:

1. llama.cpp from the source vendored in PyPI's `llama-cpp-python` sdist
   (`pip download --no-deps --no-binary :all: llama-cpp-python`), cmake Release with
   GGML_NATIVE, only the llama-bench and llama-quantize targets (~15-20 min on 2 cores).
2. An unpacked checkpoint llama.cpp's converter reads as is: float weights t / weight_scale
   (t the ternary values, so every nonzero of a tensor has one magnitude and TQ2_0/TQ1_0 hold
   them exactly), the sub-norms under the names its tensor map knows
   (`self_attn.inner_attn_ln`, `mlp.ffn_layernorm`). Two things are set in the converter's
   process, not in its files: the BPE tokenizer.json vocabulary (its BitNet class asks for a
   sentencepiece tokenizer.model, which Llama 3 tokenizers do not have) and no absmean
   re-quantization of weights that are already ternary (it would rescale them by the
   fraction of nonzeros).
3. `convert_hf_to_gguf.py --outtype f16`, then `llama-quantize` to TQ2_0 and TQ1_0, each with
   f16 and with q8_0 token embedding / output (the tied lm_head).
   With --ik-source DIR (an ik_llama.cpp source tree; a partial snapshot is extracted file by
   file with bench/extract_git_tree.py), its llama-bench and llama-quantize are built the same
   way (bench/out/ik), the f16 GGUF is copied with its architecture renamed to ik's `bitnet-25`
   (bench/gguf_arch.py: the same tensors, which ik runs with the 2B4T graph), and quantized to
   IQ2_BN (q8_0 and f16 head) and IQ2_BN_R4 (q8_0 head).
4. Timing, interleaved round by round and thread count by thread count: `llama-bench -p 128
   -n 64 -t T -r 1` per GGUF, and our engine through bench/bench_e2e.py's worker (a fresh
   process: load, warm up, prefill 128 random ids, decode 64 greedily), plus the memory floor
   before each round: bench/stream_floor.cc, plain loads over 1 GiB in 2 MiB pages, best of 7,
   at each thread count. With --depth D, a decode row after a D-token context (`-d D` in
   llama.cpp, `-gp D,64` in ik, a D-token prompt in ours) at --depth-threads. Medians over
   rounds; one markdown table with ratios to llama.cpp TQ2_0 at the same threads and to the
   floor (stream GB/s / the engine's weight file bytes, read once per decoded token), the
   CPU's ISA, load average, date, bandwidth and the command.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LLAMA_DIR = REPO / "bench" / "out" / "llama"
IK_DIR = REPO / "bench" / "out" / "ik"
LLAMA_TARGETS = ["llama-bench", "llama-quantize"]
QUANTS = [("TQ2_0", "f16"), ("TQ2_0", "q8_0"), ("TQ1_0", "f16"), ("TQ1_0", "q8_0")]
IK_QUANTS = [("IQ2_BN", "q8_0"), ("IQ2_BN", "f16"), ("IQ2_BN_R4", "q8_0")]
IK_ARCH = "bitnet-25"
SUB_NORM_NAMES = {"self_attn.attn_sub_norm": "self_attn.inner_attn_ln", "mlp.ffn_sub_norm": "mlp.ffn_layernorm"}


def log(msg: str) -> None:
    print(f"[bench_peers] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("$ " + " ".join(shlex.quote(str(c)) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ---- 1. llama.cpp build ------------------------------------------------------------------------

def llama_source() -> Path:
    LLAMA_DIR.mkdir(parents=True, exist_ok=True)
    sdists = sorted(LLAMA_DIR.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python",
             "-d", LLAMA_DIR])
        sdists = sorted(LLAMA_DIR.glob("llama_cpp_python-*.tar.gz"))
    sdist = sdists[-1]
    root = LLAMA_DIR / sdist.name[: -len(".tar.gz")]
    if not root.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(LLAMA_DIR, filter="data")
    src = root / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        raise SystemExit(f"{sdist.name} has no vendor/llama.cpp")
    return src


def build_llama() -> tuple[Path, Path, str]:
    """(llama.cpp source dir, its bin dir, the sdist version); builds when a binary is missing."""
    src = llama_source()
    build = LLAMA_DIR / "build"
    binaries = build / "bin"
    if not all((binaries / t).exists() for t in LLAMA_TARGETS):
        with open(LLAMA_DIR / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time
            if not all((binaries / t).exists() for t in LLAMA_TARGETS):
                _cmake_build(src, build)
    version = src.parent.parent.name.split("-")[-1]
    return src, binaries, version


def build_ik(src: Path) -> Path:
    """ik_llama.cpp's bin dir, built from the source folder `src` when a binary is missing."""
    if not (src / "CMakeLists.txt").exists():
        raise SystemExit(f"--ik-source {src}: no CMakeLists.txt (extract the tree with bench/extract_git_tree.py)")
    build = IK_DIR / "build"
    binaries = build / "bin"
    if not all((binaries / t).exists() for t in LLAMA_TARGETS):
        IK_DIR.mkdir(parents=True, exist_ok=True)
        with open(IK_DIR / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not all((binaries / t).exists() for t in LLAMA_TARGETS):
                _cmake_build(src, build, ik=True)
    return binaries


def _cmake_build(src: Path, build: Path, ik: bool = False) -> None:
    """Release build of llama-bench and llama-quantize. ik_llama.cpp keeps them under examples/,
    and its FlashAttention kernels for every quantized KV-cache type (GGML_IQK_FA_ALL_QUANTS) take
    most of its compile time while the benchmark's f16 cache does not use them: off."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    extra = ["-DLLAMA_BUILD_EXAMPLES=ON", "-DGGML_IQK_FA_ALL_QUANTS=OFF"] if ik else ["-DLLAMA_BUILD_EXAMPLES=OFF"]
    run(["cmake", "-S", src, "-B", build, *gen, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", *extra,
         "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"])
    run(["cmake", "--build", build, "--target", *LLAMA_TARGETS, "-j", str(os.cpu_count() or 2)])


# ---- 2. the unpacked checkpoint ----------------------------------------------------------------

def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def prepare_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Writes the unpacked checkpoint llama.cpp's converter reads (see the module docstring)."""
    from bench.make_2b4t_checkpoint import safetensors_prefix
    from export.ternary import unpack_rows

    target = out / "model.safetensors"
    if target.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{checkpoint} holds no .safetensors file")
    entries = []  # (source file, header entry, source name)
    for path in files:
        header, base = _read_safetensors_header(path)
        for name, info in header.items():
            if name != "__metadata__":
                entries.append((path, base, name, info))
    names = {e[2] for e in entries}
    plan = []  # (out name, dtype, shape, producer)
    for path, base, name, info in entries:
        if name.endswith(".weight_scale"):
            continue
        out_name = name
        for old, new in SUB_NORM_NAMES.items():
            out_name = out_name.replace(old, new)
        if info["dtype"] == "U8" and name.replace(".weight", ".weight_scale") in names:
            shape = [info["shape"][0] * 4, info["shape"][1]]
            plan.append((out_name, "BF16", shape, ("ternary", path, base, name, info)))
        else:
            plan.append((out_name, info["dtype"], info["shape"], ("copy", path, base, name, info)))
    by_name = {e[2]: e for e in entries}

    def tensor_bytes(src) -> bytes:
        kind, path, base, name, info = src
        start, end = info["data_offsets"]
        with open(path, "rb") as f:
            f.seek(base + start)
            raw = f.read(end - start)
        if kind == "copy":
            return raw
        packed = np.frombuffer(raw, np.uint8).reshape(info["shape"])
        sp, sbase, _, sinfo = by_name[name.replace(".weight", ".weight_scale")][:4]
        with open(sp, "rb") as f:
            f.seek(sbase + sinfo["data_offsets"][0])
            sraw = f.read(sinfo["data_offsets"][1] - sinfo["data_offsets"][0])
        scale = {"BF16": lambda b: _bf16_to_f32(np.frombuffer(b, np.uint16)),
                 "F32": lambda b: np.frombuffer(b, np.float32),
                 "F16": lambda b: np.frombuffer(b, np.float16).astype(np.float32)}[sinfo["dtype"]](sraw)[0]
        # the 2B4T BitLinear divides by weight_scale: the float weight is t / weight_scale
        return _f32_to_bf16(unpack_rows(packed).astype(np.float32) * np.float32(1.0 / scale)).tobytes()

    prefix, data_bytes = safetensors_prefix([(out_name, dtype, shape) for out_name, dtype, shape, _ in plan])
    log(f"writing the unpacked checkpoint {target} ({data_bytes / 1e9:.1f} GB)")
    with open(str(target) + ".partial", "wb") as f:
        f.write(prefix)
        for _, _, _, src in plan:
            f.write(tensor_bytes(src))
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (checkpoint / extra).exists():
            shutil.copyfile(checkpoint / extra, out / extra)
    os.replace(str(target) + ".partial", target)
    return out


# ---- 3. GGUF files ---------------------------------------------------------------------------

# Runs the converter with two settings of its BitNet class made in this process (its files stay
# untouched): the BPE tokenizer.json vocabulary, and weights taken as they are.
CONVERT_BOOTSTRAP = """
import sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + '/gguf-py']
import convert_hf_to_gguf
from conversion.bitnet import BitnetModel
BitnetModel.set_vocab = lambda self: self._set_vocab_gpt2()
BitnetModel.weight_quant = lambda self, weight: weight
sys.argv[0] = 'convert_hf_to_gguf.py'
convert_hf_to_gguf.main()
"""


def make_ggufs(src: Path, binaries: Path, unpacked: Path, work: Path) -> dict[str, Path]:
    f16 = work / "model-f16.gguf"
    if not f16.exists():
        run([sys.executable, "-c", CONVERT_BOOTSTRAP, src, unpacked, "--outtype", "f16", "--outfile",
             str(f16) + ".partial"])
        os.replace(str(f16) + ".partial", f16)
    return quantize_ggufs(binaries, f16, work, QUANTS, "model", "llama.cpp")


def make_ik_ggufs(ik_binaries: Path, f16: Path, work: Path) -> dict[str, Path]:
    """The f16 GGUF under ik's architecture name, quantized to ik's ternary types."""
    from bench.gguf_arch import rename_architecture

    renamed = work / f"model-f16-{IK_ARCH}.gguf"
    if not renamed.exists():
        log(f"writing {renamed} (architecture {IK_ARCH})")
        rename_architecture(f16, renamed, IK_ARCH)
    return quantize_ggufs(ik_binaries, renamed, work, IK_QUANTS, "model-ik", "ik_llama.cpp")


def quantize_ggufs(binaries: Path, f16: Path, work: Path, quants, prefix: str, engine: str) -> dict[str, Path]:
    """{"<engine> <type> (<head> head)": work/<prefix>-<type>-<head>.gguf}: `f16` quantized by that
    engine's llama-quantize to each (type, token-embedding/output type) of `quants` (kept once made)."""
    out = {}
    for qtype, head in quants:
        path = work / f"{prefix}-{qtype.lower()}-{head}.gguf"
        if not path.exists():
            run([binaries / "llama-quantize", "--token-embedding-type", head, "--output-tensor-type", head,
                 f16, str(path) + ".partial", qtype])
            os.replace(str(path) + ".partial", path)
        out[f"{engine} {qtype} ({head} head)"] = path
    return out


# ---- 4. timing --------------------------------------------------------------------------------

def build_floor_reader(work: Path) -> Path:
    """bench/stream_floor.cc compiled for this CPU (the plain-load memory floor)."""
    binary = work / "stream_floor"
    source = REPO / "bench" / "stream_floor.cc"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        run(["g++", "-O3", "-march=native", "-std=c++17", "-pthread", source, "-o", binary])
    return binary


def floor_bandwidth(reader: Path, threads: int) -> float:
    """GB/s of the best of 7 plain-load passes over 1 GiB with `threads` threads."""
    p = subprocess.run([str(reader), str(threads)], capture_output=True, text=True, check=True)
    return float(json.loads(p.stdout.strip().splitlines()[-1])["gb_per_s"])


def time_llama_depth(binaries: Path, model: Path, threads: int, depth: int, new: int, ik: bool) -> dict:
    """Decode tok/s after a `depth`-token context: `-gp depth,new` (ik), `-d depth` (llama.cpp)."""
    shape = ["-gp", f"{depth},{new}", "-p", "0", "-n", "0"] if ik else ["-d", str(depth), "-p", "0", "-n", str(new)]
    p = subprocess.run([str(binaries / "llama-bench"), "-m", str(model), *shape, "-t", str(threads), "-r", "1",
                        "-o", "json"], capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    for row in json.loads(p.stdout):
        at_depth = row.get("n_prompt") == depth if ik else row.get("n_depth") == depth
        if at_depth and row.get("n_gen") == new:
            return {"decode_tokens_per_s": row["avg_ts"]}
    return {"error": "llama-bench printed no row at that depth"}


def time_llama(binaries: Path, model: Path, threads: int, prompt: int, new: int) -> dict:
    p = subprocess.run([str(binaries / "llama-bench"), "-m", str(model), "-p", str(prompt), "-n", str(new),
                        "-t", str(threads), "-r", "1", "-o", "json"], capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    rows = json.loads(p.stdout)
    result = {}
    for row in rows:
        if row.get("n_prompt") == prompt and row.get("n_gen") == 0:
            result["prefill_tokens_per_s"] = row["avg_ts"]
        elif row.get("n_gen") == new and row.get("n_prompt") == 0:
            result["decode_tokens_per_s"] = row["avg_ts"]
    return result


def time_ours(model_dir: Path, variant: str, threads: int, prompt: int, new: int, timeout: float) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "bench_e2e.py"), str(model_dir), "--worker", variant,
           "--worker-threads", str(threads), "--prompt-tokens", str(prompt), "--new-tokens", str(new)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_isa() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ["avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_int8"]
    return " ".join(f for f in wanted if f in flags) or "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def weight_bytes(folder: Path, variant: str) -> int:
    """Bytes of an exported variant's weight files (read about once per decoded token)."""
    from runtime.folder import variant_file

    stem = Path(variant_file(variant)).name
    return sum(f.stat().st_size for f in folder.glob(stem + "*") if f.is_file())


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--ours", action="append", default=[], metavar="DIR[@VARIANT][=LABEL]",
                   help="an exported model folder to time (repeatable)")
    p.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "peers")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--ik-source", type=Path, default=None,
                   help="ik_llama.cpp source tree (bench/extract_git_tree.py extracts a partial snapshot)")
    p.add_argument("--depth", type=int, default=0, help="also time decode after this many context tokens (0: no)")
    p.add_argument("--depth-threads", default="2", help="thread counts of the depth rows")
    p.add_argument("--prepare-only", action="store_true", help="build, convert and quantize, then stop")
    p.add_argument("--markdown-out", type=Path, default=None)
    args = p.parse_args(argv)
    command = "python bench/bench_peers.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    threads = [int(t) for t in args.threads.split(",") if t]

    args.work.mkdir(parents=True, exist_ok=True)
    unpacked = prepare_checkpoint(args.checkpoint, args.work / "unpacked")
    src, binaries, version = build_llama()
    ggufs = make_ggufs(src, binaries, unpacked, args.work)
    bin_of = {name: binaries for name in ggufs}
    if args.ik_source:
        ik_binaries = build_ik(args.ik_source)
        ik_ggufs = make_ik_ggufs(ik_binaries, args.work / "model-f16.gguf", args.work)
        ggufs.update(ik_ggufs)
        bin_of.update({name: ik_binaries for name in ik_ggufs})
    floor_reader = build_floor_reader(args.work)
    if args.prepare_only:
        return 0

    ours = {}  # row name -> (folder, variant); @VARIANT times a stock baseline of the same folder
    for spec in args.ours:
        where, _, label = spec.partition("=")
        folder, _, variant = where.partition("@")
        variant = variant or "ternary"
        engine = "bitnet-onnx ternary" if variant == "ternary" else f"stock ORT {variant}"
        ours[f"{engine} ({label or Path(folder).name})"] = (Path(folder), variant)
    engines = list(ours) + list(ggufs)

    depth_threads = [int(t) for t in args.depth_threads.split(",") if t] if args.depth else []
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results: dict[tuple[str, int], list[dict]] = {}
    depth_results: dict[tuple[str, int], list[dict]] = {}
    bandwidth: dict[int, list[float]] = {}
    for r in range(args.rounds):
        for t in threads:
            bandwidth.setdefault(t, []).append(floor_bandwidth(floor_reader, t))
            order = engines[r % len(engines):] + engines[:r % len(engines)]  # rotate who goes first
            for name in order:
                if name in ours:
                    res = time_ours(*ours[name], t, args.prompt_tokens, args.new_tokens, args.timeout)
                else:
                    res = time_llama(bin_of[name], ggufs[name], t, args.prompt_tokens, args.new_tokens)
                log(f"round {r + 1} threads {t} {name}: {res.get('error') or '%.2f prefill, %.2f decode tok/s' % (res.get('prefill_tokens_per_s', 0), res.get('decode_tokens_per_s', 0))}")
                results.setdefault((name, t), []).append(res)
        for t in depth_threads:
            for name in engines[r % len(engines):] + engines[:r % len(engines)]:
                if name in ours:
                    res = time_ours(*ours[name], t, args.depth, args.new_tokens, args.timeout)
                else:
                    res = time_llama_depth(bin_of[name], ggufs[name], t, args.depth, args.new_tokens,
                                           ik=name.startswith("ik_llama.cpp"))
                log(f"round {r + 1} threads {t} depth {args.depth} {name}: {res.get('error') or '%.2f decode tok/s' % res.get('decode_tokens_per_s', 0)}")
                depth_results.setdefault((name, t), []).append(res)
    load_end = os.getloadavg()

    lines = [f"Measured {started} on {cpu_model()} ({os.cpu_count()} CPUs; ISA: {cpu_isa()}), "
             f"llama.cpp from llama-cpp-python {version}'s vendored source (GGML_NATIVE), "
             f"{args.rounds} rounds, medians; prompt {args.prompt_tokens} tokens, {args.new_tokens} decoded.",
             "",
             f"Load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, at end "
             f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
             + (" (loaded machine)" if max(load_start[0], load_end[0]) >= 0.5 else "") + ". Memory floor "
             "(bench/stream_floor.cc: plain loads over 1 GiB in 2 MiB pages, best of 7, median over rounds): "
             + ", ".join(f"{median(v):.1f} GB/s at {t} thread(s)" for t, v in bandwidth.items()) + ".",
             "", f"Command: `{command}`", "",
             "| engine | threads | prefill tok/s | decode tok/s | decode / llama.cpp TQ2_0 (q8_0 head) | decode / llama.cpp TQ2_0 (f16 head) | prefill / llama.cpp TQ2_0 (q8_0 head) | decode / ik IQ2_BN (q8_0 head) | decode / ik IQ2_BN (f16 head) | prefill / ik's fastest | weight MB / token | decode / floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in threads:
        ref = {h: median([x.get("decode_tokens_per_s") for x in results.get((f"llama.cpp TQ2_0 ({h} head)", t), [])])
               for h in ("q8_0", "f16")}
        ref_p = median([x.get("prefill_tokens_per_s") for x in results.get(("llama.cpp TQ2_0 (q8_0 head)", t), [])])
        ik = {h: median([x.get("decode_tokens_per_s") for x in results.get((f"ik_llama.cpp IQ2_BN ({h} head)", t), [])])
              for h in ("q8_0", "f16")}
        ik_prefill = [median([x.get("prefill_tokens_per_s") for x in results.get((name, t), [])])
                      for name in engines if name.startswith("ik_llama.cpp")]
        ik_p = max([v for v in ik_prefill if v], default=None)
        for name in engines:
            rows = results.get((name, t), [])
            errors = [x["error"] for x in rows if "error" in x]
            dec = median([x.get("decode_tokens_per_s") for x in rows])
            pre = median([x.get("prefill_tokens_per_s") for x in rows])
            if dec is None:
                lines.append(f"| {name} | {t} | error: {errors[0] if errors else '?'} | | | | | | | | | |")
                continue
            ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"  # noqa: E731
            weight = weight_bytes(ours[name][0], ours[name][1]) if name in ours else ggufs[name].stat().st_size
            floor_rate = median(bandwidth[t]) * 1e9 / weight if weight else None
            lines.append(f"| {name} | {t} | {pre:.1f} | {dec:.2f} | {ratio(dec, ref['q8_0'])} | "
                         f"{ratio(dec, ref['f16'])} | {ratio(pre, ref_p)} | {ratio(dec, ik['q8_0'])} | "
                         f"{ratio(dec, ik['f16'])} | {ratio(pre, ik_p)} | {weight / 1e6:.0f} | "
                         f"{ratio(dec, floor_rate)} |")
    if depth_results:
        lines += ["", f"Decode after a {args.depth}-token context (tok/s, medians):", "",
                  "| engine | threads | decode tok/s at depth | / llama.cpp TQ2_0 (q8_0 head) | / ik_llama.cpp IQ2_BN (q8_0 head) |",
                  "|---|---:|---:|---:|---:|"]
        for t in depth_threads:
            refs = [median([x.get("decode_tokens_per_s") for x in depth_results.get((ref, t), [])])
                    for ref in ("llama.cpp TQ2_0 (q8_0 head)", "ik_llama.cpp IQ2_BN (q8_0 head)")]
            for name in engines:
                dec = median([x.get("decode_tokens_per_s") for x in depth_results.get((name, t), [])])
                cells = " | ".join(f"{dec / ref:.2f}x" if dec and ref else "-" for ref in refs)
                lines.append(f"| {name} | {t} | {f'{dec:.2f}' if dec else 'error'} | {cells} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown_out:
        args.markdown_out.write_text(table + "\n")
    (args.work / "results.json").write_text(json.dumps(
        {"results": {f"{k[0]}|{k[1]}": v for k, v in results.items()},
         "depth": {f"{k[0]}|{k[1]}": v for k, v in depth_results.items()}, "bandwidth": bandwidth}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
