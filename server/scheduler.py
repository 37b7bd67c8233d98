"""One generation at a time on the CPU, a bounded wait queue, and a worker thread per job.

    gate = Gate(concurrency=1, queue_size=8)
    ticket = gate.admit()            # raises Busy when `concurrency + queue_size` are taken
    ok = await ticket.wait_async(timeout, disconnected)   # False: timed out / client left
    job = Job(ticket, engine, plan, loop, record, timeout)  # runs server.work.run_plan in a thread
    async for item in job.events(): ...
    job.cancel.set()                 # the engine stops at its next token (one decode step)

    jobs = Jobs(gate)                # the API's lifecycle of those steps, with its records
    admitted = await jobs.admit(engine, model, plan_for)           # 429 / 400 before any wait
    job = await jobs.run(admitted, queue_timeout_s=..., generation_timeout_s=...,
                         disconnected=request.is_disconnected)    # or jobs.start: both

The Gradio page can share the same gate so page and API never run two generations on the
2 cores at once: `with gate.slot(timeout=60): ...generate...` (blocking, FIFO with the API).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import dataclasses
import math
import threading
import time
import uuid
from dataclasses import dataclass, field


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


class ClientGone(Exception):
    """The client closed the request while it waited for the CPU."""


@dataclass
class JobRecord:
    """What one finished (or refused) generation did: for /v1/health and the tests."""
    id: str
    model: str = ""
    state: str = "queued"  # queued | running | done | error | abandoned (client left / queue
    # timeout) | refused (checked after admission, e.g. prompt too long)
    finish_reason: str | None = None  # engine's: stop | length | time | cancelled
    stopped_by: str | None = None  # None | "client" (disconnect) | "timeout" | "shutdown"
    new_tokens: int = 0
    tokens_at_cancel: int | None = None  # new tokens when the cancel flag was set
    queued_s: float = 0.0
    run_s: float = 0.0
    error: str | None = None
    user: str | None = None  # the request's `user` field (OpenAI's end-user id), for the operator
    t_created: float = field(default_factory=time.monotonic)

    @property
    def tokens_after_cancel(self) -> int | None:
        if self.tokens_at_cancel is None:
            return None
        return self.new_tokens - self.tokens_at_cancel


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

    def __init__(self, concurrency: int = 1, queue_size: int = 8, history: int = 256):
        self.concurrency, self.queue_size = concurrency, queue_size
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: set[Ticket] = set()
        self._numbers = itertools.count(1)
        self.records: collections.deque[JobRecord] = collections.deque(maxlen=max(history, 1))
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


class Job:
    """One request's generations (a server.work.Plan) in a worker thread; its results
    (ChoiceEvent, PromptScores) are handed to the event loop's queue."""

    _DONE = object()

    def __init__(self, ticket: Ticket, engine, plan, loop: asyncio.AbstractEventLoop, record: JobRecord,
                 timeout_s: float):
        self.ticket, self.engine, self.plan = ticket, engine, plan
        self.loop, self.record, self.timeout_s = loop, record, timeout_s
        self.cancel = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = threading.Event()  # set when the worker thread has left the engine
        self._lock = threading.Lock()
        self._tokens: dict[int, int] = {}  # choice -> new tokens so far
        self._open = plan.choices  # choices not finished yet
        self.thread = threading.Thread(target=self._run, name=f"bitnet-gen-{record.id}", daemon=True)

    @property
    def settings(self):
        return self.plan.settings

    def start(self) -> None:
        self.record.state = "running"
        self.record.queued_s = time.monotonic() - self.ticket.t_admitted
        self.thread.start()

    def stop(self, why: str) -> None:
        """Set the cancel flag (once): the engine ends at its next token."""
        with self._lock:
            if self.cancel.is_set():
                return
            if self.record.stopped_by is None:
                self.record.stopped_by = why
            self.record.tokens_at_cancel = self.record.new_tokens
            self.cancel.set()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.stop("shutdown")

    def _emit(self, item) -> None:
        """A result of the plan (from the worker thread or a choice's pump thread)."""
        event = getattr(item, "event", None)
        if event is not None:
            with self._lock:
                self._tokens[item.index] = event.stats.new_tokens
                self.record.new_tokens = sum(self._tokens.values())
                if event.done:
                    self._open -= 1
                    # the record's finish reason: the last choice's (they agree unless cut short)
                    self.record.finish_reason = event.finish_reason
                    if event.finish_reason == "time" and self.record.stopped_by is None:
                        self.record.stopped_by = "timeout"
        self._put(item)

    def _run(self) -> None:
        from .work import run_plan

        started = time.monotonic()
        # the one time limit is the engine's (finish reason "time", checked between tokens)
        plan = self.plan
        if self.timeout_s and plan.settings.max_time_s is None and plan.settings.max_new_tokens:
            plan = dataclasses.replace(plan, settings=dataclasses.replace(plan.settings, max_time_s=self.timeout_s))
        try:
            run_plan(self.engine, plan, self.cancel, self._emit)
            self.record.state = "done"
        except BaseException as e:  # reported to the client as a JSON error, never a bare 500
            self.record.state = "error"
            self.record.error = f"{type(e).__name__}: {e}"
            self._put(e)
        finally:
            self.record.run_s = time.monotonic() - started
            self.ticket.release()
            self.finished.set()
            self._put(self._DONE)

    async def events(self):
        """The plan's results in order (per choice); raises the engine's exception if it failed."""
        while True:
            item = await self.queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class Admitted:
    """A request past admission: its place in the gate, its record and its plan."""
    ticket: Ticket
    record: JobRecord
    engine: object
    plan: object


class Jobs:
    """The API's generations from admission to the end: a place in the gate, the plan (the
    prompts' token ids and settings), the wait for the CPU, a Job in its worker thread, and the
    records /v1/health and tests read."""

    def __init__(self, gate: Gate):
        self.gate = gate
        self.jobs: dict[str, Job] = {}  # id -> Job; finished ones leave when the next one starts

    def active(self) -> int:
        """Jobs whose worker thread is still inside an engine."""
        return sum(not j.finished.is_set() for j in list(self.jobs.values()))

    async def admit(self, engine, model: str, plan_for, *, id_prefix: str = "chatcmpl",
                    user: str | None = None) -> Admitted:
        """Admit the request (Busy when the queue is full) and make its plan (`plan_for()`, in
        a thread: it tokenizes; what it raises refuses the request)."""
        ticket = self.gate.admit()
        record = JobRecord(id=f"{id_prefix}-{uuid.uuid4().hex[:24]}", model=model, user=user)
        self.gate.records.append(record)
        try:
            plan = await asyncio.to_thread(plan_for)
        except BaseException:
            ticket.release()
            record.state = "refused"  # e.g. the prompt does not fit the context
            raise
        return Admitted(ticket, record, engine, plan)

    async def run(self, admitted: Admitted, *, queue_timeout_s: float, generation_timeout_s: float,
                  disconnected) -> Job:
        """Wait for the CPU (QueueTimeout; ClientGone when `disconnected()` says the client
        left) and start the job. Cancelled (a stream's client left): the place is given back."""
        ticket, record = admitted.ticket, admitted.record
        started = False
        try:
            if not await ticket.wait_async(queue_timeout_s, disconnected):
                record.state = "abandoned"
                if await disconnected():
                    record.stopped_by = "client"
                    raise ClientGone("client closed the request")
                self.gate.counters["queue_timeouts"] += 1
                retry = self.gate.retry_after_s()
                raise QueueTimeout(f"the server is busy: waited {queue_timeout_s:g} s for the CPU; "
                                   f"retry after {retry} s", retry)
            job = Job(ticket, admitted.engine, admitted.plan, asyncio.get_running_loop(), record,
                      generation_timeout_s)
            for key in [k for k, j in list(self.jobs.items()) if j.finished.is_set()]:
                self.jobs.pop(key, None)
            self.jobs[record.id] = job
            job.start()
            started = True
            self.gate.counters["started"] += 1
            return job
        finally:
            if not started:
                ticket.release()
                if record.state == "queued":
                    record.state = "abandoned"

    async def start(self, engine, model: str, plan_for, *, queue_timeout_s: float, generation_timeout_s: float,
                    disconnected, id_prefix: str = "chatcmpl", user: str | None = None) -> Job:
        """admit, then run."""
        admitted = await self.admit(engine, model, plan_for, id_prefix=id_prefix, user=user)
        return await self.run(admitted, queue_timeout_s=queue_timeout_s,
                              generation_timeout_s=generation_timeout_s, disconnected=disconnected)
