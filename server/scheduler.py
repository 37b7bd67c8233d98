"""The API's generations: a place in the CPU gate (runtime/gate.py), a worker thread per job.

    ticket = gate.admit()            # raises Busy when `concurrency + queue_size` are taken
    ok = await ticket.wait_async(timeout, disconnected)   # False: timed out / client left
    job = Job(ticket, engine, plan, loop, record, timeout)  # runs server.work.run_plan in a thread
    async for item in job.events(): ...
    job.cancel.set()                 # the engine stops at its next token (one decode step)

    jobs = Jobs(gate, history=256)   # the API's lifecycle of those steps, with its records
    admitted = await jobs.admit(engine, model, plan_for)           # 429 / 400 before any wait
    job = await jobs.run(admitted, queue_timeout_s=..., generation_timeout_s=...,
                         disconnected=request.is_disconnected)    # or jobs.start: both
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass, field

from runtime.gate import Gate, QueueTimeout, Ticket

from .work import ChoiceEvent, run_plan


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
        self.thread = threading.Thread(target=self._run, name=f"bitnet-gen-{record.id}", daemon=True)

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
        if isinstance(item, ChoiceEvent):
            event = item.event
            with self._lock:
                self._tokens[item.index] = event.stats.new_tokens
                self.record.new_tokens = sum(self._tokens.values())
                if event.done:
                    # the record's finish reason: the last choice's (they agree unless cut short)
                    self.record.finish_reason = event.finish_reason
                    if event.finish_reason == "time" and self.record.stopped_by is None:
                        self.record.stopped_by = "timeout"
        self._put(item)

    def _run(self) -> None:
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

    def __init__(self, gate: Gate, history: int = 256):
        self.gate = gate
        self.records: collections.deque[JobRecord] = collections.deque(maxlen=max(history, 1))
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
        self.records.append(record)
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
