"""The one way to open an onnxruntime session on an exported model (engine, tests, tools)."""

from __future__ import annotations

import os

from .cpus import available_threads, check_threads
from .errors import EngineError


def session_options(threads: int | None = None, custom_ops: bool = False, config: dict | None = None):
    """SessionOptions as the engine runs: `threads` intra-op threads (None: available_threads()),
    one inter-op thread, sequential execution, extra config entries (e.g.
    {"mlas.use_lut_gemm": "1"}), the bitnet custom-op library registered when `custom_ops`,
    and only errors logged (ORT's warnings are not for the end user)."""
    import onnxruntime as ort

    check_threads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or available_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    for key, value in (config or {}).items():
        so.add_session_config_entry(str(key), str(value))
    if custom_ops:
        import custom_ops as library

        so.register_custom_ops_library(library.library_path())
    return so


def open_session(model_path, *, threads: int | None = None, custom_ops: bool = False,
                 config: dict | None = None):
    """An InferenceSession (CPU) on `model_path` with session_options(threads, custom_ops, config)."""
    import onnxruntime as ort

    so = session_options(threads, custom_ops, config)
    return ort.InferenceSession(os.fspath(model_path), so, providers=["CPUExecutionProvider"])


def check_custom_ops() -> None:
    """Raise EngineError with one line saying why the custom-op library (the ternary variant)
    cannot run here and how to fix it: custom_ops.status(), the one answer to that question."""
    try:
        import custom_ops
    except ImportError as e:
        raise EngineError(f"the ternary variant needs the custom_ops package ({e}); run from the "
                          "repository root or use --variant int2") from None
    st = custom_ops.status()
    if not st.ok:
        raise EngineError(f"the ternary variant cannot run here: {st.reason}; {st.fix} (or use --variant int2)")
