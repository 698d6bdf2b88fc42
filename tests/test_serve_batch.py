"""The micro-batcher and the request renderer in-process: when a batch waits, what it takes, where its
model call runs, and how a request stops. (tests/test_serve.py drives them through a real server.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace

import numpy as np
import pytest

from digitgen.runtime.generator import DigitGenerator, GeneratedDigits
from digitgen.serve.batch import Batcher
from digitgen.serve.limits import AbandonedError, Admission, OverloadedError, TimeLimitError
from digitgen.serve.params import DigitsRequest
from digitgen.serve.render import encode, filename, generate


@pytest.fixture(scope="module")
def generator() -> DigitGenerator:
    return DigitGenerator.from_path(threads=1)


def one_digit(seed: int, count: int = 1) -> DigitsRequest:
    return DigitsRequest((seed % 10,), count, seed, None, "png" if count == 1 else "grid")


class CountingExecutor(ThreadPoolExecutor):
    """A thread pool that counts the calls given to it."""

    submitted = 0

    def submit(self, fn: Callable, /, *args: object, **kwargs: object) -> Future:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


class Recorder:
    """What the batcher did: the size of each model call, the threads it ran on, the batches it observed,
    and the generation slots it held."""

    def __init__(self, generator: DigitGenerator) -> None:
        self.generator = generator
        self.calls: list[int] = []
        self.threads: list[str] = []
        self.observed: list[int] = []
        self.slots = 0
        self.executor = CountingExecutor(1, thread_name_prefix="generation")
        self.fail_next = False

    def run(self, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        self.calls.append(len(z))
        self.threads.append(threading.current_thread().name)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the model failed")
        return self.generator.run(z, labels)

    @asynccontextmanager
    async def generation(self) -> AsyncIterator[None]:
        self.slots += 1
        yield

    def batcher(self, window: float, max_digits: int = 8) -> Batcher:
        model = SimpleNamespace(latent_dim=self.generator.latent_dim, run=self.run)
        return Batcher(model, window, max_digits, self.executor, self.generation, self.observed.append)  # type: ignore[arg-type]


def with_batcher(batcher: Batcher, body: Callable[[], Awaitable[object]]) -> object:
    """Run ``body`` while ``batcher`` serves, then stop the batcher."""

    async def main() -> object:
        task = asyncio.create_task(batcher.run())
        try:
            return await asyncio.wait_for(body(), 30)
        finally:
            task.cancel()

    try:
        return asyncio.run(main())
    finally:
        batcher.executor.shutdown()


def alone(generator: DigitGenerator, request: DigitsRequest) -> bytes:
    return encode(generate(generator, request), request.fmt)


def test_a_lone_request_runs_at_once_on_the_event_loop(generator: DigitGenerator) -> None:
    recorder = Recorder(generator)
    batcher = recorder.batcher(window=20.0)  # a window this long would time the test out if it were waited

    async def three_in_turn() -> list[GeneratedDigits]:
        return [await batcher.digits(one_digit(seed)) for seed in (1, 2, 3)]

    started = time.monotonic()
    digits = with_batcher(batcher, three_in_turn)
    assert time.monotonic() - started < 10
    assert [encode(d, "png") for d in digits] == [alone(generator, one_digit(s)) for s in (1, 2, 3)]
    assert recorder.calls == [1, 1, 1] and recorder.observed == [1, 1, 1] and recorder.slots == 3
    assert recorder.executor.submitted == 0 and set(recorder.threads) == {threading.current_thread().name}


def test_requests_that_arrive_together_share_a_call_on_the_executor(generator: DigitGenerator) -> None:
    recorder = Recorder(generator)
    batcher = recorder.batcher(window=0.5)
    requests = [one_digit(4), one_digit(5, count=3), one_digit(6)]

    async def late_joiner() -> list[GeneratedDigits]:
        first = [asyncio.ensure_future(batcher.digits(r)) for r in requests[:2]]
        await asyncio.sleep(0.05)  # within the window: joins the same call
        return await asyncio.gather(*first, batcher.digits(requests[2]))

    digits = with_batcher(batcher, late_joiner)
    assert [encode(d, r.fmt) for d, r in zip(digits, requests, strict=True)] == [alone(generator, r) for r in requests]
    assert recorder.calls == [5] and recorder.observed == [3] and recorder.slots == 1
    assert recorder.executor.submitted == 1 and recorder.threads[0].startswith("generation")


def test_after_a_shared_call_the_next_request_waits_for_company(generator: DigitGenerator) -> None:
    recorder = Recorder(generator)
    batcher = recorder.batcher(window=0.3)

    async def pair_then_one() -> float:
        await asyncio.gather(batcher.digits(one_digit(1)), batcher.digits(one_digit(2)))
        started = time.monotonic()
        await batcher.digits(one_digit(3))
        return time.monotonic() - started

    waited = with_batcher(batcher, pair_then_one)
    assert 0.25 < waited < 5 and recorder.calls == [2, 1]


def test_a_full_batch_does_not_wait_out_its_window(generator: DigitGenerator) -> None:
    recorder = Recorder(generator)
    batcher = recorder.batcher(window=20.0, max_digits=4)

    async def full() -> list[GeneratedDigits]:
        return await asyncio.gather(*(batcher.digits(one_digit(seed)) for seed in range(4)))

    started = time.monotonic()
    with_batcher(batcher, full)
    assert time.monotonic() - started < 10 and recorder.calls == [4]


def test_a_failed_call_fails_its_requests_and_the_batcher_goes_on(generator: DigitGenerator) -> None:
    recorder = Recorder(generator)
    batcher = recorder.batcher(window=0.05)
    recorder.fail_next = True

    async def fail_then_serve() -> tuple[list[object], GeneratedDigits]:
        pair = (batcher.digits(one_digit(1)), batcher.digits(one_digit(2)))
        failed = await asyncio.gather(*pair, return_exceptions=True)
        return failed, await batcher.digits(one_digit(3))

    failed, served = with_batcher(batcher, fail_then_serve)  # type: ignore[misc]
    assert [str(e) for e in failed] == ["the model failed"] * 2
    assert encode(served, "png") == alone(generator, one_digit(3))


def test_requests_given_up_while_waiting_take_no_part_in_the_call(generator: DigitGenerator) -> None:
    recorder = Recorder(generator)
    batcher = recorder.batcher(window=0.2)

    async def one_given_up() -> GeneratedDigits:
        kept = asyncio.ensure_future(batcher.digits(one_digit(1)))
        gone = asyncio.ensure_future(batcher.digits(one_digit(2, count=3)))
        await asyncio.sleep(0.05)
        gone.cancel()
        return await kept

    digits = with_batcher(batcher, one_given_up)
    assert encode(digits, "png") == alone(generator, one_digit(1))
    assert recorder.calls == [1] and recorder.observed == [1]


def test_a_batch_given_up_entirely_makes_no_call(generator: DigitGenerator) -> None:
    recorder = Recorder(generator)
    batcher = recorder.batcher(window=0.2)

    async def all_given_up() -> GeneratedDigits:
        gone = [asyncio.ensure_future(batcher.digits(one_digit(s))) for s in (1, 2)]
        await asyncio.sleep(0.05)
        for future in gone:
            future.cancel()
        await asyncio.sleep(0.3)
        return await batcher.digits(one_digit(3))

    with_batcher(batcher, all_given_up)
    assert recorder.calls == [1] and recorder.observed == [1] and recorder.slots == 1


def test_fail_waiting_answers_every_waiting_request(generator: DigitGenerator) -> None:
    async def stopped() -> list[object]:
        batcher = Recorder(generator).batcher(window=0.1)
        waiting = [asyncio.ensure_future(batcher.digits(one_digit(s))) for s in range(3)]
        await asyncio.sleep(0)
        waiting[1].cancel()
        await asyncio.sleep(0)
        batcher.fail_waiting(RuntimeError("stopped"))
        return [type(e).__name__ + str(e) for e in await asyncio.gather(*waiting, return_exceptions=True)]

    assert asyncio.run(stopped()) == ["RuntimeErrorstopped", "CancelledError", "RuntimeErrorstopped"]


def test_fail_waiting_answers_the_batch_in_the_model_too(generator: DigitGenerator) -> None:
    """A batcher stopped while its batch runs in the model leaves no request of that batch waiting."""
    recorder = Recorder(generator)
    in_model, release = threading.Event(), threading.Event()
    model_call = recorder.run

    def held(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        in_model.set()
        release.wait(30)
        return model_call(z, labels)

    recorder.run = held  # type: ignore[method-assign]
    batcher = recorder.batcher(window=0.5)

    async def stopped() -> list[object]:
        task = asyncio.create_task(batcher.run())
        requests = [asyncio.ensure_future(batcher.digits(one_digit(s))) for s in range(2)]
        await asyncio.to_thread(in_model.wait, 30)
        task.cancel()
        batcher.fail_waiting(RuntimeError("stopped"))
        release.set()
        return [repr(e) for e in await asyncio.gather(*requests, return_exceptions=True)]

    try:
        assert asyncio.run(asyncio.wait_for(stopped(), 20)) == ["RuntimeError('stopped')"] * 2
    finally:
        release.set()
        recorder.executor.shutdown()
    assert recorder.calls == [2]


# --- generating one request: stops between batches -----------------------------------------------


def test_generate_stops_once_abandoned_or_past_its_deadline(generator: DigitGenerator) -> None:
    request = DigitsRequest((2,), 600, 1, None, "npz")
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(AbandonedError):
        generate(generator, request, cancelled=cancelled)
    with pytest.raises(TimeLimitError):
        generate(generator, request, deadline=time.monotonic() - 1)
    finished = generate(generator, request, deadline=time.monotonic() + 60, cancelled=threading.Event())
    assert finished.images.shape == (600, 28, 28) and set(finished.labels.tolist()) == {2}


def test_abandoned_wins_over_the_deadline(generator: DigitGenerator) -> None:
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(AbandonedError):
        generate(generator, DigitsRequest((2,), 3, 1, None, "npz"), deadline=0.0, cancelled=cancelled)


@pytest.mark.parametrize(
    ("fmt", "first_label", "name"),
    [("png", 7, "00000000_label7.png"), ("grid", 0, "grid.png"), ("npz", 3, "digits.npz"),
     ("idx", 1, "digits-idx.tar"), ("json", 2, None)],
)  # fmt: skip
def test_filenames_are_the_clis(fmt: str, first_label: int, name: str | None) -> None:
    assert filename(fmt, first_label) == name


@pytest.mark.parametrize(
    ("in_flight", "queue", "words"),
    [(1, 0, "1 request generating, 0 waiting"), (2, 3, "2 requests generating, 3 waiting")],
)
def test_admission_refuses_past_its_bound_in_words(in_flight: int, queue: int, words: str) -> None:
    async def admit_one_too_many() -> str:
        admission = Admission(in_flight, queue)
        async with AsyncExitStack() as admitted:
            for _ in range(in_flight + queue):
                await admitted.enter_async_context(admission.admit())
            assert admission.admitted == in_flight + queue
            with pytest.raises(OverloadedError) as refused:
                await admitted.enter_async_context(admission.admit())
        assert admission.admitted == 0
        return str(refused.value)

    assert asyncio.run(admit_one_too_many()) == f"the server is busy ({words}); retry later"


def test_a_waiter_whose_client_left_gives_up_its_place_and_no_slot_is_lost() -> None:
    async def wait_then_leave() -> list[str]:
        admission = Admission(1, 3)
        said: list[str] = []
        gone = asyncio.Event()

        def leaving() -> asyncio.Event:
            said.append("watched")
            return gone

        async def waiter(deadline: float, watched: Callable[[], asyncio.Event] | None) -> str:
            try:
                async with admission.slot(deadline, watched):
                    return "served"
            except AbandonedError:
                return "abandoned"
            except TimeLimitError:
                return "late"

        async with admission.slot(time.monotonic() + 60, leaving):  # a free slot: taken without watching
            assert said == []
            left = asyncio.create_task(waiter(time.monotonic() + 60, leaving))
            late = asyncio.create_task(waiter(0, None))
            cancelled = asyncio.create_task(waiter(time.monotonic() + 60, None))
            await asyncio.sleep(0.01)
            assert admission.admitted == 3  # the holder and two waiters: the late one has gone already
            gone.set()
            said.append(await left)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert admission.admitted == 1  # only the holder: the queue is free for live clients
            said.append(await late)
        async with admission.slot(time.monotonic() + 0.5, leaving):  # the one slot is free again, taken unwatched
            said.append("served")
        return said

    assert asyncio.run(wait_then_leave()) == ["watched", "abandoned", "late", "served"]


def test_a_waiter_that_gets_its_slot_leaves_no_task_behind() -> None:
    async def served_after_waiting() -> set[asyncio.Task]:
        admission = Admission(1, 1)
        gone = asyncio.Event()

        async def waiter() -> None:
            async with admission.slot(time.monotonic() + 60, lambda: gone):
                pass

        async with admission.slot(time.monotonic() + 60):
            waiting = asyncio.create_task(waiter())
            await asyncio.sleep(0.01)
        await waiting
        await asyncio.sleep(0)  # the watch's cancellation lands
        return asyncio.all_tasks() - {asyncio.current_task()}

    assert asyncio.run(served_after_waiting()) == set()


def test_a_client_that_leaves_as_its_slot_frees_gives_the_slot_back() -> None:
    async def leave_as_the_slot_frees() -> list[str]:
        admission = Admission(1, 1)
        gone = asyncio.Event()

        async def waiter() -> str:
            try:
                async with admission.slot(time.monotonic() + 60, lambda: gone):
                    return "served"
            except AbandonedError:
                return "abandoned"

        async with admission.slot(time.monotonic() + 60):
            waiting = asyncio.create_task(waiter())
            await asyncio.sleep(0.01)
            gone.set()  # the client leaves, and the slot frees, before the waiter runs again
        said = [await waiting]
        async with admission.slot(time.monotonic() + 0.5):  # given back: free at once, else TimeLimitError
            said.append("served")
        return said

    assert asyncio.run(leave_as_the_slot_frees()) == ["abandoned", "served"]


def test_a_watched_waiter_past_its_deadline_is_late_and_holds_no_slot() -> None:
    async def late() -> list[str]:
        admission = Admission(1, 1)
        gone = asyncio.Event()
        said: list[str] = []
        async with admission.slot(time.monotonic() + 60):
            try:
                async with admission.slot(time.monotonic() + 0.05, lambda: gone):
                    said.append("served")
            except TimeLimitError:
                said.append("late")
        async with admission.slot(time.monotonic() + 60):
            with pytest.raises(TimeLimitError):  # still one slot: a second holder waits past its deadline
                async with admission.slot(time.monotonic() + 0.05):
                    pass
        return said

    assert asyncio.run(late()) == ["late"]
