"""Waiting for the CPU: a turn's engine run holds one slot of a gate (FIFO with the API's
requests); Stop withdraws a turn that is still waiting."""

from __future__ import annotations

from runtime.gate import Busy, Gate
from runtime.serving import DEFAULT_QUEUE_SIZE, serving_gate

GATE_TIMEOUT_S = 120.0


class CpuBusy(RuntimeError):
    """The CPU gate shared with the HTTP API refused the run or timed out."""


def page_gates(batch: int, gate: Gate | None = None) -> tuple[Gate, Gate]:
    """(the gate shared with the API, the baselines' own one-slot gate: they are not batched).
    The shared gate admits as many runs as the ternary batcher has slots."""
    shared = gate or serving_gate(batch, DEFAULT_QUEUE_SIZE)
    return shared, Gate(concurrency=1, queue_size=DEFAULT_QUEUE_SIZE)


def run_holding(gate: Gate, timeout_s: float, answer: dict, cancel, turns, body):
    """Run the generator `body()` holding a slot of `gate`, yielding page states; while it
    waits the answer says so, and Stop (`cancel`) gives up the place at once."""
    try:
        ticket = gate.admit()
    except Busy as e:
        raise CpuBusy(f"The server is busy ({e}); try again in a moment.") from None
    try:
        if not ticket.try_take():
            answer["state"] = "gate"
            yield turns, False
        if not ticket.wait(timeout_s, abandon=cancel):
            if cancel.is_set():
                answer.update(state="stopped", finish_reason="cancelled")
                return
            raise CpuBusy(f"Waited {timeout_s:.0f} s for the CPU (API requests ahead); try "
                          "again in a moment.")
        yield from body()
    finally:
        ticket.release()
