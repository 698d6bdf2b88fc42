"""Admission: a bounded number of generations run at once, a bounded number wait, the rest are refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class OverloadedError(Exception):
    """No room to run or wait: the caller should answer 503 with ``Retry-After``."""


class Admission:
    """``in_flight`` generations at once, ``queue`` more waiting; the next one is refused at once."""

    def __init__(self, in_flight: int, queue: int) -> None:
        self.in_flight = in_flight
        self.queue = queue
        self._slots = asyncio.Semaphore(in_flight)
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Requests running or waiting now."""
        return self._admitted

    @asynccontextmanager
    async def slot(self, deadline: float) -> AsyncIterator[None]:
        """Hold a generation slot; :class:`OverloadedError` when full or when no slot frees before ``deadline``."""
        if self._admitted >= self.in_flight + self.queue:
            raise OverloadedError(
                f"the server is busy ({self.in_flight} requests generating, {self.queue} waiting); retry later"
            )
        self._admitted += 1
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise OverloadedError("the server stayed busy past this request's time limit; retry later") from None
            try:
                yield
            finally:
                self._slots.release()
        finally:
            self._admitted -= 1
