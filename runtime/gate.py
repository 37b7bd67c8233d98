"""The CPU gate: how many generations run at once, a bounded FIFO wait queue, and the wait.

    gate = Gate(concurrency=1, queue_size=8)
    ticket = gate.admit()            # raises Busy when `concurrency + queue_size` are taken
    ok = ticket.wait(timeout)        # or: await ticket.wait_async(timeout, disconnected)
    ...generate...; ticket.release()
    with gate.slot(timeout=60): ...  # the blocking form (raises Busy / QueueTimeout)

One gate is shared by the page (playground/) and the HTTP API (server/), so both queue, first
come first served, for the same CPU: `concurrency` is one without batching and the batcher's
slots with it (runtime/serving.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import threading
import time


class Busy(Exception):
    """The wait queue is full (answer 429 with Retry-After)."""

    def __init__(self, retry_after_s: int, waiting: int, running: int):
        self.retry_after_s, self.waiting, self.running = retry_after_s, waiting, running
        super().__init__(f"server busy: {running} generation(s) running and {waiting} waiting "
                         f"(the queue is full); retry after {retry_after_s} s")


class QueueTimeout(Exception):
    """Waited longer than the queue timeout for the CPU (answer 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Ticket:
    """A place in the gate: waiting, then holding a slot, then released (once)."""

    def __init__(self, gate: "Gate", number: int):
        self.gate, self.number = gate, number
        self.holding = False
        self.released = False
        self.t_admitted = time.monotonic()
        self.t_started: float | None = None
        self._wakeup: tuple | None = None  # (loop, asyncio.Event) of an async waiter

    def wait(self, timeout: float | None = None, abandon: threading.Event | None = None) -> bool:
        """Block until this ticket holds a slot (True), or timeout / abandon (False: the
        ticket is released)."""
        return self.gate._wait(self, timeout, abandon)

    def try_take(self) -> bool:
        """Take a free slot now if this ticket is first in line (True), without waiting."""
        return self.gate._try_take(self)

    async def wait_async(self, timeout: float, disconnected=None, poll_s: float = 0.2) -> bool:
        """Wait without blocking the event loop (woken when a slot frees); `disconnected` is an
        async callable polled every `poll_s` (a client that left gives up its place)."""
        deadline = time.monotonic() + timeout
        wake = asyncio.Event()
        self._wakeup = (asyncio.get_running_loop(), wake)
        try:
            while True:
                wake.clear()
                if self.gate._try_take(self):
                    return True
                now = time.monotonic()
                if now >= deadline:
                    self.release()
                    return False
                if disconnected is not None and await disconnected():
                    self.release()
                    return False
                try:
                    await asyncio.wait_for(wake.wait(), min(poll_s, deadline - now))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._wakeup = None

    def release(self) -> None:
        self.gate._release(self)


class Gate:
    """FIFO admission: `concurrency` slots and `queue_size` waiting places."""

    def __init__(self, concurrency: int = 1, queue_size: int = 8):
        self.concurrency, self.queue_size = concurrency, queue_size
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: set[Ticket] = set()
        self._numbers = itertools.count(1)
        self.counters = collections.Counter()  # admitted, refused_busy, queue_timeouts, ...
        self._durations: collections.deque[float] = collections.deque(maxlen=32)

    # -- admission -------------------------------------------------------------------------
    def admit(self) -> Ticket:
        with self._cond:
            if len(self._waiting) + len(self._running) >= self.concurrency + self.queue_size:
                self.counters["refused_busy"] += 1
                raise Busy(self.retry_after_s(), len(self._waiting), len(self._running))
            ticket = Ticket(self, next(self._numbers))
            self._waiting.append(ticket)
            self.counters["admitted"] += 1
            return ticket

    def retry_after_s(self) -> int:
        """Seconds until a queue place is likely free: one recent mean generation time (the
        running generation must end first), at least 1 s, at most 60 s."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return int(max(1, min(60, math.ceil(mean / max(self.concurrency, 1)))))

    def _try_take(self, ticket: Ticket) -> bool:
        with self._cond:
            return self._take_locked(ticket)

    def _take_locked(self, ticket: Ticket) -> bool:
        if ticket.holding:
            return True
        if ticket.released:
            return False
        # FIFO: only the first waiters may take the free slots
        free = self.concurrency - len(self._running)
        if free > 0 and ticket in itertools.islice(self._waiting, 0, free):
            self._waiting.remove(ticket)
            self._running.add(ticket)
            ticket.holding = True
            ticket.t_started = time.monotonic()
            return True
        return False

    def _wait(self, ticket: Ticket, timeout, abandon) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._take_locked(ticket):
                if ticket.released or (abandon is not None and abandon.is_set()):
                    self._release_locked(ticket)
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._release_locked(ticket)
                    return False
                self._cond.wait(0.05 if remaining is None else min(0.05, remaining))
            return True

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            self._release_locked(ticket)

    def _release_locked(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        if ticket.holding:
            self._running.discard(ticket)
            ticket.holding = False
            self._durations.append(time.monotonic() - (ticket.t_started or ticket.t_admitted))
        else:
            with contextlib.suppress(ValueError):
                self._waiting.remove(ticket)
        self._cond.notify_all()
        for waiter in list(self._waiting)[:self.concurrency]:
            if waiter._wakeup is not None:
                loop, event = waiter._wakeup
                with contextlib.suppress(RuntimeError):  # closed loop
                    loop.call_soon_threadsafe(event.set)

    @contextlib.contextmanager
    def slot(self, timeout: float | None = None):
        """Blocking: hold a slot for the duration of the block (for the Gradio page).
        Raises Busy when the queue is full and QueueTimeout when the wait is too long."""
        ticket = self.admit()
        if not ticket.wait(timeout):
            self.counters["queue_timeouts"] += 1
            raise QueueTimeout(f"waited {timeout} s for the CPU")
        try:
            yield ticket
        finally:
            ticket.release()

    # -- state -------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def idle(self) -> bool:
        with self._cond:
            return not self._running and not self._waiting

    def snapshot(self) -> dict:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "concurrency": self.concurrency, "queue_size": self.queue_size,
                    "counters": dict(self.counters)}
