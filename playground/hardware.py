"""The machine the playground runs on, as one line for the page: CPU model, the BitLinear
kernel the custom-op dispatch chose, threads."""

from __future__ import annotations


def hardware_line(hw: dict) -> str:
    """`hw`: {"cpu", "kernel", "threads", "custom_ops": "ok" or why it cannot run}."""
    if not hw:
        return ""
    threads = hw.get("threads")
    kernel = hw.get("kernel") or "not reported"
    if hw.get("custom_ops") not in (None, "ok"):
        kernel = "unavailable"
    return (f"{hw.get('cpu') or 'unknown CPU'} · BitLinear kernel: {kernel} · {threads} "
            f"thread{'' if threads == 1 else 's'} per engine")
