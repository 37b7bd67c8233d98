"""Unit tests of the API's CPU gate (shared by the page and the API) and of its limits from the
environment. No server, no model: fast."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server import Busy, Gate, Limits, QueueTimeout


def test_gate_is_first_come_first_served_across_threads():
    gate = Gate(concurrency=1, queue_size=4)
    order, started = [], threading.Event()

    def holder():
        with gate.slot(timeout=5):
            started.set()
            time.sleep(0.2)
            order.append("first")

    t0 = threading.Thread(target=holder)
    t0.start()
    started.wait(5)
    threads = []
    for name in ("a", "b", "c"):
        def run(name=name):
            with gate.slot(timeout=5):
                order.append(name)
        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
        while gate.waiting < len(threads):  # queue them in a known order
            time.sleep(0.005)
    for t in [t0, *threads]:
        t.join(10)
    assert order == ["first", "a", "b", "c"]
    assert gate.idle()


def test_gate_busy_and_timeout():
    gate = Gate(concurrency=1, queue_size=1)
    running = gate.admit()
    assert running.wait(1)
    waiting = gate.admit()
    with pytest.raises(Busy) as e:
        gate.admit()
    assert e.value.retry_after_s >= 1 and "queue is full" in str(e.value)
    with pytest.raises(Busy):
        with gate.slot(timeout=0.1):
            pass
    assert not waiting.wait(0.1)  # times out and gives its place up
    assert gate.waiting == 0
    with pytest.raises(QueueTimeout):
        with gate.slot(timeout=0.1):
            pass
    running.release()
    running.release()  # twice is harmless
    assert gate.idle()
    with gate.slot(timeout=1):
        assert gate.running == 1
    assert gate.idle()


def _async_wait_until_released(gate, schedule_release):
    """An async waiter behind a held slot; `schedule_release(held)` frees it in 0.1 s."""
    held = gate.admit()
    assert held.wait(1)

    async def main():
        ticket = gate.admit()
        schedule_release(held)
        t0 = time.monotonic()
        ok = await ticket.wait_async(5, poll_s=5)  # no polling: only the wake-up can end it early
        return ok, time.monotonic() - t0, ticket

    ok, waited, ticket = asyncio.run(main())
    assert ok and waited < 1.0
    ticket.release()


def test_async_waiter_is_woken_by_a_sync_release():
    gate = Gate(concurrency=1, queue_size=2)
    # released from the loop thread
    _async_wait_until_released(gate, lambda held: asyncio.get_running_loop().call_later(0.1, held.release))
    # the same across threads: a page (thread) releases, an API request (loop) takes over
    _async_wait_until_released(gate, lambda held: threading.Timer(0.1, held.release).start())
    assert gate.idle()


def test_async_waiter_gives_up_when_the_client_leaves():
    gate = Gate(concurrency=1, queue_size=2)
    held = gate.admit()
    assert held.wait(1)

    async def main():
        ticket = gate.admit()
        calls = []

        async def disconnected():
            calls.append(1)
            return len(calls) >= 2

        ok = await ticket.wait_async(5, disconnected, poll_s=0.02)
        return ok

    assert asyncio.run(main()) is False
    assert gate.waiting == 0
    held.release()


def test_limits_from_env():
    env = {"BITNET_API_QUEUE_SIZE": "3", "BITNET_API_QUEUE_TIMEOUT_S": "2.5", "BITNET_API_MAX_BODY_BYTES": "1e4",
           "BITNET_API_CONCURRENCY": ""}
    limits = Limits.from_env(env)
    assert (limits.queue_size, limits.queue_timeout_s, limits.max_body_bytes, limits.concurrency) == (3, 2.5, 10000, 1)
    assert Limits.from_env(env, queue_size=5).queue_size == 5
    with pytest.raises(ValueError, match="BITNET_API_QUEUE_SIZE"):
        Limits.from_env({"BITNET_API_QUEUE_SIZE": "lots"})
    with pytest.raises(ValueError, match="concurrency"):
        Limits.from_env({"BITNET_API_CONCURRENCY": "0"})
    assert Limits.env_names()["queue_size"] == "BITNET_API_QUEUE_SIZE"
