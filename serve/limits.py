"""Admission: a bounded number of generations run at once, a bounded number wait, the rest are refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from digitgen.runtime.text import counted


class OverloadedError(Exception):
    """No room to run or wait: the caller should answer 503 with ``Retry-After``."""


class TimeLimitError(Exception):
    """The request ran past its deadline, waiting for a generation slot or generating."""


class Admission:
    """``in_flight`` generations at once, ``queue`` more waiting; the next one is refused at once. ``on_change``
    is told the number admitted each time it changes."""

    def __init__(self, in_flight: int, queue: int, on_change: Callable[[int], None] = lambda _admitted: None) -> None:
        self.in_flight = in_flight
        self.queue = queue
        self._slots = asyncio.Semaphore(in_flight)
        self._admitted = 0
        self._on_change = on_change

    @property
    def admitted(self) -> int:
        """Requests running or waiting now."""
        return self._admitted

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Count a request as admitted; :class:`OverloadedError` when ``in_flight + queue`` already are."""
        if self._admitted >= self.in_flight + self.queue:
            generating = f"{counted(self.in_flight, 'request')} generating"
            raise OverloadedError(f"the server is busy ({generating}, {self.queue} waiting); retry later")
        self._admitted += 1
        try:
            self._on_change(self._admitted)
            yield
        finally:
            self._admitted -= 1
            self._on_change(self._admitted)

    @asynccontextmanager
    async def generation(self, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold a generation slot; :class:`TimeLimitError` when none frees before ``deadline``."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=timeout)
        except TimeoutError:
            raise TimeLimitError from None
        try:
            yield
        finally:
            self._slots.release()

    @asynccontextmanager
    async def slot(self, deadline: float) -> AsyncIterator[None]:
        """Be admitted and hold a generation slot (see :meth:`admit` and :meth:`generation`)."""
        async with self.admit(), self.generation(deadline):
            yield
