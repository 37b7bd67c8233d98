"""The banner at the top of the page: preparation progress, the failure, or the live model
with the machine it runs on and how visitors share the CPU."""

from __future__ import annotations

from .hardware import hardware_line


def banner_markdown(pg) -> str:
    """`pg`: the Playground."""
    if pg.state in ("starting", "preparing"):
        tail = "\n".join(list(pg.log_lines)[-6:]) or "starting"
        return ("### ⏳ Preparing the model, please wait\n"
                f"`{pg.model_spec}`: the first start downloads and exports it once "
                "(later starts reuse the cache).\n\n```text\n" + tail + "\n```")
    if pg.state == "failed":
        return f"### ❌ The model could not be prepared\n```text\n{pg.error}\n```"
    r = pg.resolved
    cfg = pg.config
    lines = [f"**Live model: {r.name}** · variants {', '.join(pg.variants_available())} · "
             f"context {cfg.get('context_length', '?')} tokens · {hardware_line(pg.hardware)}"
             f" · {serving_line(pg.batch, pg.ternary_ok)}"]
    if not pg.ternary_ok:
        lines.append(f"⚠️ **The ternary engine is unavailable on this machine:** {pg.ops.reason}. "
                     f"Fix: {pg.ops.fix}. The stock baselines still run.")
    if r.notice:
        lines.append(f"⚠️ {r.notice}")
    if int(cfg.get("hidden_size") or 0) and int(cfg.get("hidden_size")) < 1024:
        lines.append("At this model size the timings mostly show per-token overheads; the "
                     "ternary kernels pay off on large models such as 2B4T.")
    return "\n\n".join(lines)


def serving_line(batch: int, ternary_ok: bool) -> str:
    """How visitors share the CPU (one short line on the page)."""
    if batch and ternary_ok:
        return (f"the ternary engine serves everyone in one batch (up to {batch} streams "
                "per decode step, page and API); the baselines run one visitor at a time")
    return "one engine at a time"
