"""The machine the playground runs on, for the page: CPU model, the BitLinear kernel the
custom-op dispatch chose, threads; and whether the custom op can run at all
(`custom_ops.status()`: .ok .reason .fix .kernel .cpu, never raises)."""

from __future__ import annotations


def hardware_line(hw: dict) -> str:
    """CPU model, the kernel the custom-op dispatch chose, threads: one line for the page."""
    if not hw:
        return ""
    threads = hw.get("threads")
    kernel = hw.get("kernel") or "not reported"
    if hw.get("custom_ops") not in (None, "ok"):
        kernel = "unavailable"
    return (f"{hw.get('cpu') or 'unknown CPU'} · BitLinear kernel: {kernel} · {threads} "
            f"thread{'' if threads == 1 else 's'} per engine")


class _OpsStatus:
    """custom_ops.status() as documented (.ok .reason .fix .kernel .cpu), for a custom_ops
    without it: loads the library to find out."""

    def __init__(self, ok, reason="", fix="", kernel=None, cpu=""):
        self.ok, self.reason, self.fix, self.kernel, self.cpu = ok, reason, fix, kernel, cpu


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def custom_ops_status():
    try:
        import custom_ops
    except ImportError as e:
        return _OpsStatus(False, f"the custom_ops package cannot be imported ({e})",
                          "run from the repository root", None, _cpu_model())
    status = getattr(custom_ops, "status", None)
    if status is not None:
        return status()
    try:
        custom_ops.library_path()
        return _OpsStatus(True, "", "", None, _cpu_model())
    except Exception as e:  # noqa: BLE001 - BuildError: no compiler, no headers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return _OpsStatus(False, f"the custom-op library cannot be built: {first}",
                          "install a C++ compiler and ONNX Runtime's headers (python -m custom_ops build)",
                          None, _cpu_model())
