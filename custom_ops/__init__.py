"""The bitnet custom-op library for ONNX Runtime: the ternary `BitLinear`, the lm_heads
`MatMulF16` (fp16 table) and `MatMulI8` (int8 table, per-row scales).

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(custom_ops.library_path())

`library_path()` compiles the library on first use (and when its sources changed);
`pack_ternary(w)` turns int8 ternary weights [N, K] into the layout `BitLinear` reads.
Set BITNET_KERNEL=reference|avx2|avxvnni|avx512|avx512vnni|amx (ARM64: reference|neon|dotprod) to
force a feature level (default: the best the CPU has); `kernel_table(features)` says which
kernel each op runs at a level.
`status()` says whether the operator can run here (why not, how to fix), the kernel level the
dispatch chose and the CPU model; it never raises.
"""

from __future__ import annotations

import ctypes
import functools
import platform

import numpy as np

from .build import BuildError, ensure_built
from .operator_status import Status, cpu_model, status

DOMAIN = "bitnet"
# The CPU feature bits the library's queries take and return (custom_ops/src/kernels.h's
# CpuFeature), with names for messages. Which features each BITNET_KERNEL level needs is the
# library's own table: KERNELS and LEVEL_FEATURES below are read from it.
FEATURE_AVX2, FEATURE_AVX512, FEATURE_AVX512VNNI, FEATURE_AVXVNNI = 1, 2, 4, 8
FEATURE_NEON, FEATURE_DOTPROD, FEATURE_AMX = 16, 32, 64
FEATURE_NAMES = {FEATURE_AVX2: "AVX2/FMA/F16C", FEATURE_AVX512: "AVX-512 F/BW/VL",
                 FEATURE_AVX512VNNI: "AVX-512 VNNI", FEATURE_AVXVNNI: "AVX-VNNI",
                 FEATURE_NEON: "ARM64 NEON", FEATURE_DOTPROD: "ARM64 dot product (sdot)",
                 FEATURE_AMX: "AMX-TILE/AMX-INT8 (and the OS's permission)"}
ARM64 = platform.machine().lower() in ("aarch64", "arm64")

GROUP_COLS = 32  # output columns per packed group: two 16-lane halves of a 128-byte block
HALF_COLS = 16   # columns per 64-byte half (one int32 lane each in a 512-bit register)
BLOCK_K = 16     # reduction values per block

__all__ = ["DOMAIN", "KERNELS", "BuildError", "library_path", "pack_ternary", "packed_shape",
           "available_kernels", "kernel_levels", "session_options", "cpu_features", "kernel_table", "missing_features",
           "quantize_head_table", "status", "Status", "cpu_model", "resolve_kernel"]


def library_path() -> str:
    """Path of the built library, building it first when missing or older than its sources.

    Raises BuildError naming what is missing (compiler, headers) when it cannot be built.
    """
    return str(ensure_built())


def packed_shape(n: int, k: int) -> tuple[int, int]:
    """Shape of pack_ternary's output for weights [n, k]: [groups of 32 columns, bytes per group]."""
    groups = -(-n // GROUP_COLS)
    kp = -(-k // BLOCK_K) * BLOCK_K
    return groups, kp * GROUP_COLS // 4


def pack_ternary(w: np.ndarray) -> np.ndarray:
    """Packs ternary weights w [N, K] (values -1, 0, 1) into BitLinear's 2-bit layout.

    Columns are grouped by 32 and K is padded to a multiple of 16; each group is a stream of
    128-byte blocks (32 columns x 16 k) made of two 64-byte halves (columns 16h .. 16h+15).
    Byte 4*j + t of half h holds the codes w + 1 of column 16h + j at k = 16*b + 4*i + t in
    bits 2i..2i+1 (see custom_ops/src/kernels.h).
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"pack_ternary expects a 2-D array [N, K], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.integer):
        raise ValueError(f"pack_ternary expects integer ternary weights, got dtype {w.dtype}")
    if w.size and (w.min() < -1 or w.max() > 1):
        raise ValueError("pack_ternary expects values in {-1, 0, 1}")
    n, k = w.shape
    groups, _ = packed_shape(n, k)
    kp = -(-k // BLOCK_K) * BLOCK_K
    codes = np.ones((groups * GROUP_COLS, kp), dtype=np.uint8)  # padding code 1 means w = 0
    codes[:n, :k] = (w + 1).astype(np.uint8)
    # [group, half, j, block, i, t] -> [group, block, i, half, j, t]
    c = codes.reshape(groups, 2, HALF_COLS, kp // BLOCK_K, 4, 4).transpose(0, 3, 4, 1, 2, 5)
    packed = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return np.ascontiguousarray(packed).reshape(packed_shape(n, k))


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(library_path())
    lib.bitnet_resolve_kernel.restype = ctypes.c_char_p
    lib.bitnet_resolve_kernel.argtypes = [ctypes.c_char_p]
    lib.bitnet_cpu_features.restype = ctypes.c_uint32
    lib.bitnet_kernel_table.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
    lib.bitnet_kernel_levels.restype = ctypes.c_size_t
    lib.bitnet_kernel_levels.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return lib


@functools.lru_cache(maxsize=1)
def kernel_levels() -> dict[str, int]:
    """{BITNET_KERNEL level: the CPU feature bits it needs}, weakest first, for the architecture
    the library was built for: the dispatch's own table (custom_ops/src/dispatch.cc)."""
    lib = _library()
    buf = ctypes.create_string_buffer(lib.bitnet_kernel_levels(None, 0) + 1)
    lib.bitnet_kernel_levels(buf, len(buf))
    return {name: int(bits) for name, bits in (line.split() for line in buf.value.decode().splitlines())}


def __getattr__(name: str):
    # KERNELS (the levels, weakest first) and LEVEL_FEATURES ({level: bits}) load the library
    # on first use, so importing custom_ops never builds it.
    if name == "KERNELS":
        return tuple(kernel_levels())
    if name == "LEVEL_FEATURES":
        return dict(kernel_levels())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_kernel(requested: str = "auto") -> str:
    """The kernel BITNET_KERNEL=requested selects on this CPU ("" when it cannot run here)."""
    return _library().bitnet_resolve_kernel(requested.encode()).decode()


def available_kernels() -> list[str]:
    """The kernels this CPU can run, reference first."""
    return [k for k in kernel_levels() if resolve_kernel(k) == k]


def cpu_features() -> int:
    """This CPU's feature bits (FEATURE_*), as the dispatch sees them."""
    return int(_library().bitnet_cpu_features())


def kernel_table(features: int) -> dict:
    """Which kernel each op runs for a feature bitmask (a pure function: any machine can ask
    about any CPU): {"level", "BitLinear", "MatMulF16", "MatMulI8"}."""
    buf = ctypes.create_string_buffer(128)
    _library().bitnet_kernel_table(features, buf, len(buf))
    level, bitlinear, f16, i8 = buf.value.decode().split()
    return {"level": level, "BitLinear": bitlinear, "MatMulF16": f16, "MatMulI8": i8}


def missing_features(level: str) -> list[str]:
    """The CPU features a BITNET_KERNEL level needs that this CPU lacks (names)."""
    lacking = kernel_levels()[level] & ~cpu_features()
    return [name for bit, name in FEATURE_NAMES.items() if lacking & bit]


def quantize_head_table(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [N, K] -> (int8 codes [N, K], float32 scales [N]) for MatMulI8 and the embedding:
    per row, scale = max|w| / 127 (1 for an all-zero row), code = round_half_even(w / scale),
    so row n is approximately codes[n] * scales[n]. Done in chunks of rows (small temporaries)."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"quantize_head_table expects a 2-D array [N, K], got shape {weight.shape}")
    n, k = weight.shape
    codes = np.empty((n, k), np.int8)
    scales = np.empty(n, np.float32)
    for start in range(0, n, 8192):
        rows = np.asarray(weight[start:start + 8192], np.float32)
        scale = np.abs(rows).max(axis=1) / np.float32(127.0) if k else np.zeros(len(rows), np.float32)
        scale[scale == 0] = 1.0
        codes[start:start + 8192] = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8)
        scales[start:start + 8192] = scale
    return codes, scales


def session_options(threads: int | None = None):
    """onnxruntime.SessionOptions with the library registered and `threads` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.register_custom_ops_library(library_path())
    return so
