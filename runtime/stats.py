"""Per-generation statistics and process memory."""

from __future__ import annotations

import dataclasses
import os
import resource
from dataclasses import dataclass


_process = None  # psutil's handle on this process, made once per pid: making one reads /proc
                # several times, and the stats are sampled once per generated token


def rss_mb() -> float:
    """Current resident memory of the whole process, MB (2**20 bytes)."""
    global _process
    try:
        import psutil

        if _process is None or _process.pid != os.getpid():  # a forked child gets its own
            _process = psutil.Process()
        return _process.memory_info().rss / 2**20
    except Exception:  # psutil missing: /proc
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of the whole process since it started, MB.

    Linux: VmHWM of /proc/self/status (the high-water mark of this program's memory).
    getrusage's ru_maxrss is the fallback only: on Linux it survives exec(), so a process
    started by a big parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0  # request start (incl. tokenization) -> first new token chosen
    prefill_tokens_per_s: float = 0.0  # prompt tokens / prefill model time
    decode_tokens_per_s: float = 0.0  # tokens after the first / time since the first
    total_s: float = 0.0
    rss_mb: float = 0.0  # current RSS of the process (all generations, all models in it)
    peak_rss_mb: float = 0.0  # peak RSS of the process since it started
    variant: str = ""
    threads: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_cache_tokens: int = 0  # capacity of this generation's KV cache
    kv_cache_mb: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def copy(self) -> "GenerationStats":
        return dataclasses.replace(self)

