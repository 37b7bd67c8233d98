"""Which turns each page session has running or waiting, so Stop can end them.

A turn registers a cancel event for the time it runs; Stop sets the events of that
session: a running engine ends after its current token, a turn waiting for the CPU leaves
the queue at once.
"""

from __future__ import annotations

import contextlib
import threading


class CancelRegistry:
    def __init__(self):
        self._events: dict[str, set[threading.Event]] = {}  # session -> its turns' events
        self._lock = threading.Lock()
        self.active = 0  # turns running or waiting, all sessions

    @contextlib.contextmanager
    def turn(self, session: str):
        """The cancel event of one turn of `session`, registered while the block runs."""
        event = threading.Event()
        with self._lock:
            self._events.setdefault(session, set()).add(event)
            self.active += 1
        try:
            yield event
        finally:
            with self._lock:
                self.active -= 1
                events = self._events.get(session)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._events[session]

    def pending(self, session: str) -> bool:
        """Is a turn of `session` running or waiting for the CPU?"""
        with self._lock:
            return bool(self._events.get(session))

    def stop(self, session: str) -> bool:
        """Cancel every turn of `session`; False when it had none."""
        with self._lock:
            events = list(self._events.get(session, ()))
        for event in events:
            event.set()
        return bool(events)
