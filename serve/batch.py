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
from digitgen.serve.render import encode


@dataclass(frozen=True)
class _Pending:
    request: DigitsRequest
    body: asyncio.Future[bytes]


def run_batch(generator: DigitGenerator, requests: list[DigitsRequest]) -> list[bytes]:
    """The response bodies of ``requests`` from one model call over all their digits."""
    noise = standard_normal_spans([NoiseSpan(r.seed, 0, r.count, r.truncation) for r in requests], generator.latent_dim)
    labels = [labels_for(r.digits, 0, r.count) for r in requests]
    images = to_uint8(generator.run(noise, np.concatenate(labels)))
    bodies, start = [], 0
    for request, request_labels in zip(requests, labels, strict=True):
        digits = GeneratedDigits(images[start : start + request.count], request_labels)
        bodies.append(encode(digits, request.fmt))
        start += request.count
    return bodies


class Batcher:
    """Collects requests for up to ``window`` seconds after the first, at most ``max_digits`` digits in all
    (a larger request gets a call of its own), then makes their bodies in one call of :func:`run_batch` on
    ``executor``, holding a ``generation()`` slot, and passes the number of requests to ``observe``. The
    window is waited only while requests come together: a request that arrives alone, after a batch of
    one, runs at once, on the event loop as without batching (a thread hop costs more than one small
    request's model call)."""

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
        self._arrived = asyncio.Event()
        self._last_size = 0

    async def body(self, request: DigitsRequest) -> bytes:
        """The response body of ``request``; needs :meth:`run` running."""
        pending = _Pending(request, asyncio.get_running_loop().create_future())
        self._waiting.append(pending)
        self._arrived.set()
        return await pending.body

    async def _collect(self) -> list[_Pending]:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        if self._last_size > 1 or len(self._waiting) > 1:
            until = loop.time() + self.window
            while sum(p.request.count for p in self._waiting) < self.max_digits and loop.time() < until:
                self._arrived.clear()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), until - loop.time())
        batch = [self._waiting.popleft()]
        digits = batch[0].request.count
        while self._waiting and digits + self._waiting[0].request.count <= self.max_digits:
            batch.append(self._waiting.popleft())
            digits += batch[-1].request.count
        return [p for p in batch if not p.body.done()]

    async def run(self) -> None:
        """Serve the waiting requests until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._last_size = len(batch)
            if not batch:
                continue
            self.observe(len(batch))
            try:
                async with self.generation():
                    requests = [p.request for p in batch]
                    bodies = (
                        run_batch(self.generator, requests)
                        if len(requests) == 1
                        else await loop.run_in_executor(self.executor, run_batch, self.generator, requests)
                    )
            except Exception as exc:  # each request of the batch gets the error its own call would raise
                for pending in batch:
                    if not pending.body.done():
                        pending.body.set_exception(exc)
                continue
            for pending, body in zip(batch, bodies, strict=True):
                if not pending.body.done():
                    pending.body.set_result(body)
