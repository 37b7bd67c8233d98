"""The playground's engines: built from the model folder on first use, warmed up, kept.

The ternary engine is a runtime.batcher.BatchedEngine when `batch` > 0 (runtime/serving.py:
page visitors and API clients share its decode steps); the baselines are plain Engines, and
besides the ternary engine at most one baseline stays loaded (an fp32 2B model is ~10 GB).
"""

from __future__ import annotations

import logging
import threading

from .conversation import TERNARY

log = logging.getLogger("bitnet-onnx.app")


class EngineCache:
    def __init__(self, threads: int, batch: int):
        self.threads, self.batch = threads, batch
        self.engines: dict = {}  # variant -> engine
        self._lock = threading.Lock()

    def get(self, folder: str, variant: str):
        """The engine of `variant` of the model in `folder`, loaded on first use."""
        with self._lock:
            engine = self.engines.get(variant)
            if engine is not None:
                return engine
            from runtime import Engine
            from runtime.serving import serving_engine

            if variant != TERNARY:
                for other in [v for v in self.engines if v != TERNARY]:
                    del self.engines[other]
            engine = Engine(folder, variant=variant, threads=self.threads)
            warm_up(engine)
            engine = serving_engine(engine, self.batch)
            self.engines[variant] = engine
            return engine

    def served(self):
        """The engine the API serves: the ternary one; where the custom op cannot run, the
        baseline the page serves."""
        return self.engines.get(TERNARY) or next(iter(self.engines.values()), None)


def warm_up(engine) -> None:
    """One short generation, so the first visitor's timings do not include onnxruntime's
    first-run costs (allocations, kernel selection) on one engine and not the other."""
    from runtime import GenerationSettings

    try:
        engine.generate(messages=[{"role": "user", "content": "Hi"}],
                        settings=GenerationSettings(max_new_tokens=2, stop_token_ids=[]))
    except Exception as e:  # noqa: BLE001 - a warm-up failure shows up in the first chat
        log.warning("warm-up of %s failed: %s", engine, e)
