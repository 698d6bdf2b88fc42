"""Admission: a bounded number of generations run at once, a bounded number wait, the rest are refused."""

from __future__ import annotations

import asyncio
import time
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from digitgen.runtime.text import counted


class OverloadedError(Exception):
    """No room to run or wait: the caller should answer 503 with ``Retry-After``."""


class TimeLimitError(Exception):
    """The request ran past its deadline, waiting for a generation slot or generating."""


class AbandonedError(Exception):
    """Nobody waits for the response any more (its client left, or its task was cancelled): the request gave up its
    place in the queue, or its generation stopped."""


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
    async def generation(
        self, deadline: float | None = None, leaving: Callable[[], asyncio.Event] | None = None
    ) -> AsyncIterator[None]:
        """Hold a generation slot; :class:`TimeLimitError` when none frees before ``deadline``,
        :class:`AbandonedError` when the event ``leaving()`` gives is set first (the client left while the request
        waited; called only when the request has to wait)."""
        await self._take_slot(None if deadline is None else max(0.0, deadline - time.monotonic()), leaving)
        try:
            yield
        finally:
            self._slots.release()

    async def _take_slot(self, timeout: float | None, leaving: Callable[[], asyncio.Event] | None) -> None:
        """Take a generation slot, or raise having taken none."""
        if not self._slots.locked():  # a slot free and no one before this request: taken at once
            await self._slots.acquire()
            return
        taking = asyncio.ensure_future(self._slots.acquire())
        gone = leaving() if leaving is not None else None
        left = asyncio.ensure_future(gone.wait()) if gone is not None else None
        try:
            await asyncio.wait([taking, *([left] if left else [])], timeout=timeout, return_when=FIRST_COMPLETED)
        except BaseException:  # the request cancelled while it waited
            self._give_back(taking)
            raise
        finally:
            if left is not None:
                left.cancel()
        if gone is not None and gone.is_set():
            self._give_back(taking)
            raise AbandonedError
        if not taking.done():
            taking.cancel()  # a slot freed for it meanwhile goes to the next in line (asyncio.Semaphore)
            raise TimeLimitError

    def _give_back(self, taking: asyncio.Future[bool]) -> None:
        """Give back the slot ``taking`` took, or stop it taking one."""
        if taking.done() and not taking.cancelled():
            self._slots.release()
        else:
            taking.cancel()

    @asynccontextmanager
    async def slot(self, deadline: float, leaving: Callable[[], asyncio.Event] | None = None) -> AsyncIterator[None]:
        """Be admitted and hold a generation slot (see :meth:`admit` and :meth:`generation`)."""
        async with self.admit(), self.generation(deadline, leaving):
            yield
