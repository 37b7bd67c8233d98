"""Preparing the model in the background, so the page can show progress: can the custom op
run here, which folder to serve (playground/models.py), the first engines loaded and warmed
up."""

from __future__ import annotations

import logging
import time

import custom_ops

from .conversation import NO_BASELINE, TERNARY
from .hardware import hardware_line
from .hub import choose_operator_library

log = logging.getLogger("bitnet-onnx.app")


def prepare(pg) -> None:
    """Bring the Playground `pg` from "preparing" to "ready" (or "failed", with the reason on
    the page); its progress goes to pg.progress."""
    pg.state = "preparing"
    try:
        pg.progress(choose_operator_library(pg.model_spec).message)  # the folder's, or a build
        pg.ops = custom_ops.status()  # never raises: .ok .reason .fix .kernel .cpu
        pg.hardware = {"cpu": pg.ops.cpu, "kernel": pg.ops.kernel, "threads": pg.threads,
                       "custom_ops": "ok" if pg.ops.ok else pg.ops.reason}
        pg.progress(hardware_line(pg.hardware))
        if not pg.ops.ok:
            pg.progress(f"the ternary engine cannot run here: {pg.ops.reason}; {pg.ops.fix}")
        pg.resolved = pg.resolver(pg.model_spec, variants=pg.variants_requested,
                                  progress=pg.progress)
        baselines = [b for b in pg.baselines() if b != NO_BASELINE]
        if not pg.ops.ok and not baselines:
            raise RuntimeError(f"the ternary engine cannot run here ({pg.ops.reason}) and the "
                               "model folder has no stock baseline")
        # the engines a first visitor needs: ternary and the default baseline (or the baseline
        # alone where the custom op cannot run)
        first = [TERNARY] + baselines[:1] if pg.ops.ok else baselines[:1]
        for variant in first:
            pg.progress(f"loading the {variant} engine")
            started = time.time()
            pg.engine(variant)
            pg.progress(f"{variant} engine loaded and warmed up in {time.time() - started:.1f} s")
        pg.state = "ready"
        pg.progress(f"ready: serving {pg.resolved.name}")
    except BaseException as e:  # noqa: BLE001 - shown on the page, not a crash
        pg.state = "failed"
        pg.error = f"{type(e).__name__}: {e}"
        pg.progress(f"start-up failed: {pg.error}")
        log.exception("model preparation failed")
