"""How many threads this process should run: the CPUs it may really use."""

from __future__ import annotations

import math
import os

_CGROUP_V2 = "/sys/fs/cgroup/cpu.max"
_CGROUP_V1 = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_quota(root: str = "/") -> float | None:
    """CPUs of time the cgroup grants (quota / period), None when unlimited or unknown."""
    v2 = os.path.join(root, _CGROUP_V2.lstrip("/"))
    try:
        with open(v2) as f:
            parts = f.read().split()
        if parts and parts[0] != "max":
            period = float(parts[1]) if len(parts) > 1 else 100000.0
            return float(parts[0]) / period if period > 0 else None
        return None
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, _CGROUP_V1[0].lstrip("/"))) as f:
            quota = float(f.read().strip())
        with open(os.path.join(root, _CGROUP_V1[1].lstrip("/"))) as f:
            period = float(f.read().strip())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def check_threads(threads) -> None:
    """ValueError unless `threads` (a thread count option) is None or a positive integer."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")


def available_threads(root: str = "/") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (v2 or v1) CPU quota.

    Containers such as a Hugging Face Space often see every core of the host but get 2 CPUs
    of time; one thread per visible core would oversubscribe them. `root` is for tests.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota(root)
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)
