"""Per-generation statistics and process memory."""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from dataclasses import dataclass


def rss_mb() -> float:
    """Current resident memory of the whole process, MB (2**20 bytes)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
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


class StatsClock:
    """Fills a generation's GenerationStats as it goes and snapshots them into its events."""

    def __init__(self, stats: GenerationStats, started: float, event_type):
        self.stats, self.started, self.event_type = stats, started, event_type
        self.t_prefill = time.perf_counter()
        self.t_first = None

    def prefilled(self, n_prompt: int) -> None:
        self.stats.prefill_s = time.perf_counter() - self.t_prefill
        self.stats.prefill_tokens_per_s = n_prompt / max(self.stats.prefill_s, 1e-9)

    def first_token(self) -> None:
        self.t_first = time.perf_counter()
        self.stats.ttft_s = self.t_first - self.started

    def event(self, **kw):
        """An `event_type` (GenerationEvent) carrying a snapshot of the stats."""
        s, now = self.stats, time.perf_counter()
        s.new_tokens += len(kw["token_ids"])
        s.total_s = now - self.started
        if s.new_tokens > 1:
            s.decode_s = now - self.t_first
            s.decode_tokens_per_s = (s.new_tokens - 1) / max(s.decode_s, 1e-9)
        s.rss_mb = rss_mb()
        s.peak_rss_mb = max(peak_rss_mb(), s.rss_mb)
        return self.event_type(stats=s.copy(), **kw)
