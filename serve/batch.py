"""Micro-batching: small requests that arrive together share one model call.

Each request's digits are the same as alone: the noise of digit ``i`` of seed ``s`` is a function of
``(s, i)`` only, and the model computes each row of a batch on its own.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass

import numpy as np

from digitgen.runtime.generator import DigitGenerator, GeneratedDigits, labels_for, to_uint8
from digitgen.runtime.noise import NoiseSpan, standard_normal_spans
from digitgen.serve.params import DigitsRequest


@dataclass(frozen=True)
class _Pending:
    request: DigitsRequest
    digits: asyncio.Future[GeneratedDigits]


def batch_inputs(requests: list[DigitsRequest], latent_dim: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The noise of all the requests' digits, in order, and each request's labels."""
    noise = standard_normal_spans([NoiseSpan(r.seed, 0, r.count, r.truncation) for r in requests], latent_dim)
    return noise, [labels_for(r.digits, 0, r.count) for r in requests]


def split_batch(images: np.ndarray, labels: list[np.ndarray]) -> list[GeneratedDigits]:
    """One model call's images, (B, 1, 28, 28) floats, as each request's digits."""
    ends = np.cumsum([len(request_labels) for request_labels in labels])
    parts = np.split(to_uint8(images), ends[:-1])
    return [GeneratedDigits(pixels, request_labels) for pixels, request_labels in zip(parts, labels, strict=True)]


class Batcher:
    """Collects requests for up to ``window`` seconds after the first, at most ``max_digits`` digits in all
    (a larger request gets a call of its own), then makes their digits in one model call on ``executor``,
    holding a ``generation()`` slot, and passes the number of requests to ``observe``. Only the model call
    runs on ``executor``, where it does not hold the GIL; noise and the split run on the event loop, and
    each request encodes its own body while the next batch's model call runs. The window is waited only
    while requests come together: a request that arrives alone, after a batch of one, runs at once, on the
    event loop as without batching (a thread hop costs more than one small request's model call)."""

    def __init__(
        self,
        generator: DigitGenerator,
        window: float,
        max_digits: int,
        executor: Executor,
        generation: Callable[[], AbstractAsyncContextManager[None]],
        observe: Callable[[int], None],
    ) -> None:
        self.generator = generator
        self.window = window
        self.max_digits = max_digits
        self.executor = executor
        self.generation = generation
        self.observe = observe
        self._waiting: deque[_Pending] = deque()
        self._running: list[_Pending] = []  # the batch taken from the queue, until each request has its answer
        self._arrived = asyncio.Event()
        self._last_size = 0

    async def digits(self, request: DigitsRequest) -> GeneratedDigits:
        """The digits of ``request``; needs :meth:`run` running."""
        pending = _Pending(request, asyncio.get_running_loop().create_future())
        self._waiting.append(pending)
        self._arrived.set()
        return await pending.digits

    def fail_waiting(self, error: BaseException) -> None:
        """Answer every request the batcher still holds, waiting or in the batch it was running, with ``error``
        (the batcher has stopped and will not serve them)."""
        for pending in [*self._running, *self._waiting]:
            if not pending.digits.done():
                pending.digits.set_exception(error)
        self._running, self._waiting = [], deque()

    async def _collect(self) -> list[_Pending]:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        if self._last_size > 1 or len(self._waiting) > 1:
            until = loop.time() + self.window
            while self._waiting_digits() < self.max_digits and loop.time() < until:
                self._arrived.clear()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), until - loop.time())
        # requests past their time limit no longer want an answer: neither digits nor a place in the batch
        self._waiting = deque(p for p in self._waiting if not p.digits.done())
        if not self._waiting:
            return []
        batch = [self._waiting.popleft()]
        digits = batch[0].request.count
        while self._waiting and digits + self._waiting[0].request.count <= self.max_digits:
            batch.append(self._waiting.popleft())
            digits += batch[-1].request.count
        return batch

    def _waiting_digits(self) -> int:
        """The digits of the waiting requests that still want an answer (not those past their time limit)."""
        return sum(p.request.count for p in self._waiting if not p.digits.done())

    async def run(self) -> None:
        """Serve the waiting requests until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            batch = self._running = await self._collect()
            self._last_size = len(batch)
            if not batch:
                continue
            self.observe(len(batch))
            try:
                async with self.generation():
                    noise, labels = batch_inputs([p.request for p in batch], self.generator.latent_dim)
                    inputs = (noise, np.concatenate(labels))
                    if len(batch) == 1:  # alone: on the event loop, as without batching
                        images = self.generator.run(*inputs)
                    else:
                        images = await loop.run_in_executor(self.executor, self.generator.run, *inputs)
                    results = split_batch(images, labels)
            except Exception as exc:  # each request of the batch gets the error its own call would raise
                for pending in batch:
                    if not pending.digits.done():
                        pending.digits.set_exception(exc)
                continue
            for pending, digits in zip(batch, results, strict=True):
                if not pending.digits.done():
                    pending.digits.set_result(digits)
            self._running = []
