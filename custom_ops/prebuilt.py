"""Use the operator library an exported folder carries instead of compiling one here.

    choice = adopt_folder_library(folder)   # before the first custom_ops.library_path()
    print(choice.message)                   # says which library the process will use and why

`python -m export` puts a copy of the library into the folder (custom_ops/install.py), built
on the exporting machine for its architecture and against its ONNX Runtime API version; the
kernels are chosen at load time from the CPU's features, so the copy runs on any CPU of that
architecture. A machine serving a published folder (a Space) therefore needs no compiler and
no header download when the copy works here. "Works" is tested, not assumed: the copy must
load (architecture, C/C++ runtime), export the entry points this package calls, register
with the installed onnxruntime, and compute a small BitLinear node in an ONNX Runtime session
equal to the numpy reference (an onnxruntime older than the copy's API version registers
nothing, which only a session shows). Otherwise the library is built here as usual.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from . import build
from .errors import first_line

# Entry points custom_ops/__init__.py calls through ctypes, besides ORT's RegisterCustomOps.
ENTRY_POINTS = ("RegisterCustomOps", "bitnet_resolve_kernel", "bitnet_cpu_features", "bitnet_kernel_table",
                "bitnet_kernel_levels")


@dataclass(frozen=True)
class LibraryChoice:
    source: str   # "folder": the folder's copy; "built": already built here; "build": will compile here
    path: str     # the library the process uses ("" when it still has to be built)
    message: str  # one line for the start-up log


def probe(path) -> str:
    """"" when the library at `path` runs here, else one line saying why it does not."""
    path = os.fspath(path)
    try:
        lib = ctypes.CDLL(os.path.realpath(path))
    except OSError as e:  # another architecture, a newer C/C++ runtime, not a library at all
        return f"it does not load on this {platform.machine()} system ({first_line(e)[:300]})"
    missing = [name for name in ENTRY_POINTS if not hasattr(lib, name)]
    if missing:
        return f"it lacks {', '.join(missing)} (made by another version of bitnet-onnx)"
    lib.bitnet_resolve_kernel.restype = ctypes.c_char_p
    lib.bitnet_resolve_kernel.argtypes = [ctypes.c_char_p]
    if not lib.bitnet_resolve_kernel(os.environ.get("BITNET_KERNEL", "auto").encode()):
        return f"it cannot run BITNET_KERNEL={os.environ.get('BITNET_KERNEL')} on this CPU"
    try:
        return _check_a_bitlinear_node(os.path.realpath(path))
    except Exception as e:  # noqa: BLE001 - whatever onnxruntime says, in one line
        return f"onnxruntime cannot use it ({first_line(e)[:300]})"


def _check_a_bitlinear_node(path: str) -> str:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from . import DOMAIN, pack_ternary
    from .reference import bitlinear

    k, n = 64, 32
    rng = np.random.default_rng(0)
    w = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    scale = (rng.random(n) + 0.5).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    node = helper.make_node("BitLinear", ["X", "W", "S"], ["Y"], domain=DOMAIN, K=k, N=n)
    graph = helper.make_graph(
        [node], "probe", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(pack_ternary(w), "W"), numpy_helper.from_array(scale, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.register_custom_ops_library(path)
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"X": x})
    if not np.allclose(y, bitlinear(x, w, scale), rtol=1e-5, atol=1e-5):
        return "its BitLinear result differs from the reference on this CPU"
    return ""


def adopt_folder_library(folder) -> LibraryChoice:
    """Make custom_ops.library_path() return the folder's copy when no up-to-date build exists
    here and the copy works here (probe); otherwise leave the build as it is. Says which."""
    built = build.build_dir() / build.LIBRARY_NAME
    if not build._is_stale(built):
        return LibraryChoice("built", str(built), f"operator library: the one built here ({built})")
    copy = Path(os.fspath(folder)) / build.LIBRARY_NAME if folder else None
    if copy is None or not copy.is_file():
        why = "the model folder carries none" if folder else "no model folder to take it from"
        return LibraryChoice("build", "", f"operator library: compiling it here ({why})")
    problem = probe(copy)
    if problem:
        return LibraryChoice("build", "", f"operator library: the model folder's copy cannot be used "
                                          f"here: {problem}; compiling it here")
    build.adopt(copy)
    return LibraryChoice("folder", str(copy), f"operator library: using the model folder's copy ({copy}); "
                                              "it runs here, so nothing is compiled or downloaded")
