"""How a server runs a model: the one setup `python app.py`, `python -m server` and the page share.

`--batch SLOTS` decides two things together: the ternary engine becomes a BatchedEngine whose
decode step serves up to SLOTS streams (page visitors and API clients alike), and the CPU gate
(runtime/gate.py) admits that many generations at once. `--batch 0` serves one generation at a
time through the plain Engine. The baselines are never batched (one run at a time).

    engine = serving_engine(Engine(folder, "ternary", threads=...), batch)
    gate = serving_gate(batch, queue_size)      # the server's own limits: server.Limits.for_batch
"""

from __future__ import annotations

from .batcher import BatchedEngine
from .gate import Gate

# 4 sequences per decode step suits a 2-core box.
DEFAULT_SLOTS = 4
DEFAULT_QUEUE_SIZE = 16  # generations that may wait for the CPU
BATCHED_VARIANTS = ("ternary",)  # the variant the page and the API serve to everyone


def check_batch(batch) -> int:
    """The --batch option as an int; ValueError when it is negative."""
    if isinstance(batch, bool) or int(batch) != batch or batch < 0:
        raise ValueError(f"--batch must be an integer >= 0, got {batch!r}")
    return int(batch)


def is_batched(variant: str, batch: int) -> bool:
    """Whether `variant` is served through a batcher of `batch` slots."""
    return check_batch(batch) > 0 and variant in BATCHED_VARIANTS


def serving_engine(engine, batch: int):
    """`engine` as a server runs it: a BatchedEngine of `batch` slots when the variant is
    batched, else the engine itself."""
    return BatchedEngine(engine, slots=batch) if is_batched(engine.variant, batch) else engine


def concurrency(batch: int) -> int:
    """Generations the gate admits at once: the batcher's slots, or one without batching."""
    return max(1, check_batch(batch))


def serving_gate(batch: int, queue_size: int = DEFAULT_QUEUE_SIZE) -> Gate:
    """The CPU gate for a server that batches `batch` streams (see concurrency)."""
    return Gate(concurrency(batch), queue_size)
