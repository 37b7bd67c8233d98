"""Can the bitnet operator run here? `status()` answers once per process, never raises.

    st = custom_ops.status()
    if not st.ok:
        print(f"ternary engine unavailable: {st.reason}; {st.fix}")
    print(f"{st.cpu}, kernel {st.kernel}")

It builds the library if needed, loads it into ONNX Runtime the way a session would (so a
library ONNX Runtime refuses, or a BITNET_KERNEL this CPU cannot run, shows up here), and
asks the dispatch which kernel level it chose. The page, the server and `python -m runtime`
print `reason` and `fix` when the operator is unavailable, and `cpu` and `kernel` as the
hardware line.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from dataclasses import dataclass

from .errors import BuildError, first_line


@dataclass(frozen=True)
class Status:
    ok: bool            # the library is built and ONNX Runtime loads it
    reason: str         # one line: why the operator cannot run ("" when ok)
    fix: str            # one line: how to make it run ("" when ok)
    kernel: str | None  # the kernel level the dispatch chose (e.g. "avx512vnni", "neon"); None when not ok
    cpu: str            # the CPU model, for the hardware line


# ARM Ltd (implementer 0x41) CPU parts, for /proc/cpuinfo on ARM64 Linux, which names no model.
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse V1", "0xd41": "Cortex-A78",
             "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2",
             "0xd49": "Neoverse N2", "0xd4f": "Neoverse V2", "0xd80": "Cortex-A520", "0xd81": "Cortex-A720",
             "0xd8e": "Neoverse N3", "0xd84": "Neoverse V3"}


def cpu_from_cpuinfo(text: str) -> str | None:
    """The CPU model in /proc/cpuinfo's text (None when it names none)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    for key in ("model name", "Model", "Hardware", "cpu model", "cpu"):  # x86, boards, others
        if fields.get(key):
            return fields[key]
    part = fields.get("CPU part", "").lower()
    if fields.get("CPU implementer", "").lower() == "0x41" and part in ARM_PARTS:
        return f"ARM {ARM_PARTS[part]}"
    if "CPU implementer" in fields:
        return f"ARM64 CPU (implementer {fields['CPU implementer']}, part {fields.get('CPU part', '?')})"
    return None


def cpu_model() -> str:
    """The CPU model: /proc/cpuinfo on Linux, sysctl on macOS, the platform string elsewhere."""
    try:
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo", errors="replace") as f:
                found = cpu_from_cpuinfo(f.read())
            if found:
                return found
        if platform.system() == "Darwin":
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    except Exception:  # a hardware line is never worth an exception
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _fix_for(error: Exception) -> str:
    if isinstance(error, BuildError) and error.fix:
        return first_line(error.fix)
    return ("see the README's 'Build on Linux / macOS / Windows' section; meanwhile the stock "
            "variants (int2, int4, fp32) run without the operator")


@functools.lru_cache(maxsize=1)
def status() -> Status:
    """Whether the bitnet custom operator can run in this process, why not, and how to fix it."""
    cpu = cpu_model()
    try:
        from . import _library, library_path
    except Exception as e:  # a broken install: still answer
        return Status(False, f"custom_ops cannot be imported: {first_line(e)}",
                      "reinstall the repository's requirements (pip install -r requirements.txt)", None, cpu)
    try:
        path = library_path()
    except BuildError as e:
        return Status(False, first_line(e), _fix_for(e), None, cpu)
    except Exception as e:
        return Status(False, f"building the custom-op library failed: {first_line(e)}",
                      _fix_for(e), None, cpu)
    try:
        import onnxruntime as ort

        ort.SessionOptions().register_custom_ops_library(path)  # what every session does
    except Exception as e:
        message = first_line(e)
        if "BITNET_KERNEL" in message:
            fix = "unset BITNET_KERNEL or set it to a level this CPU runs (see custom_ops.available_kernels())"
        else:
            fix = "rebuild with `python -m custom_ops build --force` against headers no newer than the installed onnxruntime"
        return Status(False, f"ONNX Runtime cannot load {os.path.basename(path)}: {message}", fix, None, cpu)
    try:
        kernel = _library().bitnet_resolve_kernel(os.environ.get("BITNET_KERNEL", "auto").encode()).decode()
    except Exception as e:
        return Status(False, f"the custom-op library does not answer its kernel query: {first_line(e)}",
                      "rebuild with `python -m custom_ops build --force`", None, cpu)
    return Status(True, "", "", kernel or None, cpu)
