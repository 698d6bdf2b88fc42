"""The serve app in-process, through httpx's ASGI transport (no sockets, no subprocess): lifespans and
warm-up, micro-batching, time limits, unexpected errors, settings and the access log."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from digitgen.runtime.errors import ModelRunError
from digitgen.runtime.generator import DEFAULT_BATCH_SIZE, DigitGenerator, GeneratedDigits
from digitgen.serve import ServeConfigError, ServeSettings, create_app, page
from digitgen.serve.app import _Client, _Service, _ServiceEntry
from digitgen.serve.batch import Batcher, _Pending
from digitgen.serve.observe import ACCESS_LOG, Metrics
from digitgen.serve.page import PageFiles
from digitgen.serve.params import DigitsRequest
from digitgen.serve.render import encode, generate
from tests.test_serve import MIXED

# --- the generator under concurrent calls ------------------------------------------------------


def test_concurrent_calls_equal_serial_results() -> None:
    generator = DigitGenerator.from_path(threads=1)
    requests = [(n, seed) for seed in range(6) for n in (1, 300)]
    serial = [generator.generate(n, seed=seed).images for n, seed in requests]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda r: generator.generate(r[0], seed=r[1]).images, requests))
    for one, other in zip(serial, concurrent, strict=True):
        np.testing.assert_array_equal(one, other)


# --- micro-batching: the same bytes, whoever shares the model call ---------------------------------


def _through_a_batcher(generator: DigitGenerator, requests: list[DigitsRequest]) -> tuple[list[bytes], list[int]]:
    """Each request's bytes when all arrive at once at a :class:`Batcher`, and the sizes of its batches."""
    sizes: list[int] = []

    async def main() -> list[GeneratedDigits]:
        with ThreadPoolExecutor(1) as pool:
            total = sum(r.count for r in requests)
            batcher = Batcher(generator, 0.05, total, pool, contextlib.nullcontext, sizes.append)
            running = asyncio.create_task(batcher.run())
            try:
                return await asyncio.gather(*(batcher.digits(r) for r in requests))
            finally:
                running.cancel()

    return [encode(d, r.fmt) for d, r in zip(asyncio.run(main()), requests, strict=True)], sizes


def test_a_mixed_batch_gives_each_request_its_own_bytes() -> None:
    generator = DigitGenerator.from_path(threads=1)
    alone = [encode(generate(generator, request), request.fmt) for request in MIXED]
    for requests, expected in ((MIXED, alone), (MIXED[::-1], alone[::-1]), (MIXED[:1], alone[:1])):
        assert _through_a_batcher(generator, requests) == (expected, [len(requests)])


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"batch_window_ms": -1}, "the batch window must be 0 ms (off) or a finite number of ms, got -1"),
        ({"batch_window_ms": float("inf")}, "the batch window must be 0 ms (off) or a finite number of ms, got inf"),
        ({"batch_max_digits": 0}, "a micro-batch must hold at least 1 digit, got 0"),
        (
            {"batch_window_ms": 0, "batch_max_digits": 64},
            "batch_max_digits=64 sizes a micro-batch and batch_window_ms=0 turns them off: give one",
        ),
        (
            {"batch_window_ms": 2000, "time_limit": 2},
            "the batch window of 2000 ms must be shorter than the time limit of 2 s, or every request that waits for "
            "a batch runs out of time",
        ),
        ({"batch_max_digits": 8.0}, "batch_max_digits must be an integer or None, got 8.0"),
        ({"max_in_flight": 0}, "max_in_flight must be at least 1, got 0"),
        ({"max_count": 0}, "max_count must be at least 1, got 0"),
        ({"max_count": 2**63 + 1}, f"max_count must be at most {2**63} (the digits of one seed), got {2**63 + 1}"),
        ({"queue": -1}, "queue must be 0 or more, got -1"),
        ({"inline_digits": -1}, "inline_digits must be 0 or more, got -1"),
        (
            {"inline_digits": 257},
            "inline_digits must be at most 256, got 257: a request that small is made in one model call on the "
            "event loop, which no time limit stops and no other request passes",
        ),
        ({"cache_max_age": -1}, "cache_max_age must be 0 or more, got -1"),
        ({"time_limit": 0}, "the time limit must be more than 0 s, got 0"),
        (
            {"cors_origins": "https://app.example"},
            "cors_origins must be a tuple of origins, e.g. ('https://app.example',), got 'https://app.example'",
        ),
        ({"cors_origins": (1,)}, "cors_origins must be a tuple of origins, e.g. ('https://app.example',), got (1,)"),
        ({"max_count": "10"}, "max_count must be an integer, got '10'"),
        ({"max_count": None}, "max_count must be an integer, got None"),
        ({"max_in_flight": 1.5}, "max_in_flight must be an integer, got 1.5"),
        ({"queue": True}, "queue must be an integer, got True"),
        ({"time_limit": "30"}, "time_limit must be a number, got '30'"),
        ({"access_log": "no"}, "access_log must be True or False, got 'no'"),
        ({"web_dir": 3}, "web_dir must be a folder's path (a str or a Path) or None, got 3"),
        *[
            (
                {"cors_origins": ("https://app.example", origin)},
                f"{origin!r} is not an origin: scheme://host[:port] with no path, as browsers send it "
                "(e.g. https://app.example)",
            )
            for origin in [
                "https://app.example/",
                "app.example",
                "https://app.example/page",
                "not a url",
                "",
                "https://user@app.example",  # user info, which browsers never send
                "https://app.example:",  # an empty port
                "https://app.example:0443",  # browsers send no leading zero
                "https://app.example:99999",
                "https://app.example:0",
            ]
        ],
        *[
            (
                {"cors_origins": (origin,)},
                f"{origin!r} holds a wildcard, which CORS never matches: it compares whole origins; give each one "
                "(or * alone for any)",
            )
            for origin in ["https://*.example", "*://app.example", "https://app.example:*"]
        ],
        (
            {"cors_origins": ("https://app.example", "*")},
            "* allows every origin, so the others given with it would do nothing: give * alone",
        ),
        (
            {"cors_origins": ("*", "*")},
            "the origin '*' is given twice",
        ),
        (
            {"cors_origins": ("https://a.example", "https://b.example", "https://a.example")},
            "the origin 'https://a.example' is given twice",
        ),
        *[
            ({"cors_origins": (origin,)}, f"browsers send the origin {origin!r} as {sent!r}; give that")
            for origin, sent in [
                ("https://App.Example", "https://app.example"),
                ("https://app.example:443", "https://app.example"),
                ("HTTP://localhost:80", "http://localhost"),
            ]
        ],
    ],
)
def test_settings_that_would_refuse_every_request_are_refused(setting: dict, words: str) -> None:
    with pytest.raises(ServeConfigError) as refused:
        ServeSettings(**setting)
    assert str(refused.value) == words


@pytest.mark.parametrize(
    ("generator", "settings", "words"),
    [
        (None, None, "create_app needs a DigitGenerator (DigitGenerator.from_path(...)), got None"),
        ("model.onnx", None, "create_app needs a DigitGenerator (DigitGenerator.from_path(...)), got 'model.onnx'"),
        ("the generator", {"max_count": 5}, "settings must be a ServeSettings, got {'max_count': 5}"),
        ("the generator", "no metrics", "metrics must be a Metrics, got 'no metrics'"),
    ],
)
def test_create_app_refuses_what_is_not_a_generator_or_settings(
    generator: object, settings: object, words: str
) -> None:
    given = DigitGenerator.from_path(threads=1) if generator == "the generator" else generator
    with pytest.raises(ServeConfigError) as refused:
        if settings == "no metrics":
            create_app(given, metrics=settings)  # type: ignore[arg-type]
        else:
            create_app(given, settings)  # type: ignore[arg-type]
    assert str(refused.value) == words


def test_the_smallest_settings_and_any_origin_a_browser_sends_are_accepted() -> None:
    origins = (
        "https://app.example",
        "http://localhost:5173",
        "https://[::1]:8443",
        "tauri://localhost",
        "http://a:8080",
        "https://a:80",  # not the default port of https
        "http://a:443",
        "http://127.0.0.1:65535",
        "https://xn--bcher-kva.example",  # a non-ASCII name as browsers send it
    )
    settings = ServeSettings(
        max_count=1,
        max_in_flight=1,
        queue=0,
        inline_digits=0,
        cache_max_age=0,
        batch_max_digits=1,
        cors_origins=origins,
    )
    assert (settings.queue, settings.inline_digits, settings.cache_max_age, settings.batch_max_digits) == (0, 0, 0, 1)
    assert settings.micro_batch_digits == 1
    assert ServeSettings(cors_origins=("*",)).cors_origins == ("*",)
    assert ServeSettings(batch_window_ms=0).batch_window_ms == 0
    # a micro-batch: 8 digits when not given and batching is on, None with it off; the field keeps what was given
    assert [ServeSettings(batch_window_ms=ms).micro_batch_digits for ms in (2, 0)] == [8, None]
    assert ServeSettings().batch_max_digits is None
    # so settings derived from the defaults can turn batching off, as ServeSettings(batch_window_ms=0) does
    assert dataclasses.replace(ServeSettings(), batch_window_ms=0).micro_batch_digits is None
    assert ServeSettings(batch_window_ms=1999, time_limit=2).batch_window_ms == 1999
    assert ServeSettings(inline_digits=256).inline_digits == 256  # one default batch: the most


# --- lifespans, warm-up, limits and errors -----------------------------------------------------


def asgi_client(app: FastAPI) -> httpx.AsyncClient:
    """A client that calls ``app`` in this process, through no socket."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://digitgen.test")


async def _lifespan_responses(app: FastAPI, paths: list[str]) -> list[httpx.Response]:
    """Run ``app``'s lifespan, wait for ``/readyz`` to stop saying that the warm-up has not run, then GET
    ``paths``; the ``/readyz`` response first."""
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        deadline = time.monotonic() + 30
        while "has not run" in (ready := await client.get("/readyz")).text and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return [ready, *[await client.get(path) for path in paths]]


def before_each_model_call(generator: DigitGenerator, hook: Callable[[np.ndarray], None]) -> None:
    """Call ``hook(z)`` before each of ``generator``'s model calls, to count, hold or fail them."""
    model_call = generator.run

    def run(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        hook(z)
        return model_call(z, labels)

    generator.run = run  # type: ignore[method-assign]


@pytest.mark.parametrize("window_ms", [2, 0])
def test_one_app_serves_through_lifespans_in_turn(window_ms: float) -> None:
    """A test suite (or a host app) may start and stop the same app more than once, with micro-batching
    on or off."""
    generator = DigitGenerator.from_path(threads=1)
    app = create_app(generator, ServeSettings(access_log=False, time_limit=10, batch_window_ms=window_ms))
    expected = encode(generate(generator, DigitsRequest((3,), 1, 9, None, "png")), "png")
    batch_sizes: list[int] = []
    before_each_model_call(generator, lambda z: batch_sizes.append(len(z)))
    threads_before = set(threading.enumerate())
    for _ in range(2):
        # one digit through the batcher (or on the event loop), 100 on a generation thread
        ready, one, many = asyncio.run(_lifespan_responses(app, ["/generate?digit=3&seed=9", "/generate?count=100"]))
        assert (ready.status_code, one.status_code, many.status_code) == (200, 200, 200)
        assert one.content == expected
        assert set(threading.enumerate()) <= threads_before  # its generation threads were joined
    assert batch_sizes.count(DEFAULT_BATCH_SIZE) == 1  # warmed up once: a ready app is not warmed up again


@pytest.mark.parametrize("query", ["count=20&format=npz", "digit=3"], ids=["on-a-thread", "micro-batched"])
def test_the_warmup_holds_a_generation_slot(query: str) -> None:
    """The warm-up counts among --max-in-flight: a request that arrives while it runs waits for it."""
    generator = DigitGenerator.from_path(threads=1)
    warming, release = threading.Event(), threading.Event()
    running, most_at_once = [0], [0]
    lock = threading.Lock()

    def hold_the_warmup(z: np.ndarray) -> None:
        with lock:
            running[0] += 1
            most_at_once[0] = max(most_at_once[0], running[0])
        if len(z) == DEFAULT_BATCH_SIZE:
            warming.set()
            release.wait(30)
        with lock:
            running[0] -= 1

    before_each_model_call(generator, hold_the_warmup)
    app = create_app(generator, ServeSettings(access_log=False, max_in_flight=1))

    async def request_during_the_warmup() -> httpx.Response:
        async with app.router.lifespan_context(app), asgi_client(app) as client:
            await asyncio.to_thread(warming.wait, 30)
            answer = asyncio.create_task(client.get(f"/generate?{query}&seed=4"))
            await asyncio.sleep(0.3)
            assert not answer.done()  # waiting for the warm-up's slot
            release.set()
            return await asyncio.wait_for(answer, 30)

    try:
        answer = asyncio.run(request_during_the_warmup())
    finally:
        release.set()
    assert answer.status_code == 200
    assert most_at_once[0] == 1


def test_stop_returns_once_the_batcher_has_ended() -> None:
    """No batch runs after stop(), and the loop may close at once without a pending task left behind."""

    async def stopped() -> bool:
        service = _Service(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False), Metrics())
        service.start()
        async with asyncio.timeout(30):  # the warm-up done, stop() has nothing else to wait for
            while not service.ready:
                await asyncio.sleep(0.01)
        batching = service._batching
        assert batching is not None and not batching.done()
        await service.stop()
        return batching.cancelled()  # here, before asyncio.run's own clean-up cancels what is left

    assert asyncio.run(stopped())


def test_stop_answers_the_requests_the_batcher_held() -> None:
    """A host that stops the app without cancelling its requests first still gets them answered, with a 503,
    rather than left waiting for their time limit."""
    generator = DigitGenerator.from_path(threads=1)
    app = create_app(generator, ServeSettings(access_log=False, batch_window_ms=100, time_limit=25))
    in_model, release = threading.Event(), threading.Event()

    def hold_batches(z: np.ndarray) -> None:
        if len(z) > 1:
            in_model.set()
            release.wait(30)

    async def run() -> list[httpx.Response]:
        async with asgi_client(app) as client:
            async with app.router.lifespan_context(app):
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)
                before_each_model_call(generator, hold_batches)
                requests = [asyncio.create_task(client.get(f"/generate?digit=3&seed={s}")) for s in range(3)]
                await asyncio.to_thread(in_model.wait, 30)
                threading.Timer(0.5, release.set).start()  # stop() waits for the generation thread
            return await asyncio.gather(*requests)

    started = time.monotonic()
    try:
        answers = asyncio.run(run())
    finally:
        release.set()
    assert time.monotonic() - started < 15
    stopped = [a for a in answers if a.status_code == 503]
    assert stopped and all(a.json() == {"error": "the server is stopping; retry later"} for a in stopped)
    assert {a.status_code for a in answers} <= {200, 503}


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (RuntimeError("onnxruntime could not run the model"), "RuntimeError: onnxruntime could not run the model"),
        (ModelRunError("the model's output is not (N, 1, 28, 28)"), "the model's output is not (N, 1, 28, 28)"),
    ],
)
def test_a_failed_warmup_is_named_by_readyz_and_the_log(
    caplog: pytest.LogCaptureFixture, error: Exception, words: str
) -> None:
    """In digitgen's own words where it has them, with the exception's type where it does not."""
    generator = DigitGenerator.from_path(threads=1)

    def broken(z: np.ndarray) -> None:
        raise error

    before_each_model_call(generator, broken)
    with caplog.at_level("ERROR", logger="digitgen.serve"):
        (ready,) = asyncio.run(_lifespan_responses(create_app(generator, ServeSettings(access_log=False)), []))
    assert ready.json() == {"error": f"not ready: {words}"}
    # one line a warm-up: /readyz may have started a second one (it tries again after a failure)
    assert {(r.name, r.getMessage()) for r in caplog.records} == {("digitgen.serve", f"warm-up batch failed: {words}")}


def test_a_failed_warmup_is_tried_again_until_ready() -> None:
    generator = DigitGenerator.from_path(threads=1)
    calls = []

    def fails_once(z: np.ndarray) -> None:
        calls.append(len(z))
        if len(calls) == 1:
            raise RuntimeError("the GPU is busy")

    before_each_model_call(generator, fails_once)
    app = create_app(generator, ServeSettings(access_log=False))

    async def probes() -> list[httpx.Response]:
        async with app.router.lifespan_context(app), asgi_client(app) as client:
            answers = [await client.get("/readyz")]
            deadline = time.monotonic() + 30
            while answers[-1].status_code != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                answers.append(await client.get("/readyz"))
            return answers

    answers = asyncio.run(probes())
    assert answers[-1].status_code == 200, answers[-1].text
    assert any(a.json() == {"error": "not ready: RuntimeError: the GPU is busy"} for a in answers)
    assert len(calls) == 2  # one failed warm-up, one that worked: no more


def _in_process(app: FastAPI, requests: list[tuple[str, dict[str, str]]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with asgi_client(app) as client:
            return [await client.get(path, headers=headers) for path, headers in requests]

    return asyncio.run(run())


@pytest.fixture
def bare_access_log() -> Iterator[None]:
    """The access log as a fresh process has it: no handler of its own, passing its lines on."""
    kept = ACCESS_LOG.handlers[:], ACCESS_LOG.propagate, ACCESS_LOG.level
    ACCESS_LOG.handlers.clear()
    ACCESS_LOG.propagate = True
    yield
    ACCESS_LOG.handlers[:], ACCESS_LOG.propagate, ACCESS_LOG.level = kept


@pytest.mark.usefixtures("bare_access_log")
def test_a_host_apps_logging_gets_each_access_line_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app that configured logging (a handler on the root logger, as basicConfig puts there, at its WARNING)
    gets the lines through it, and no second copy on stderr."""
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings())  # the access log on
    (alive,) = _in_process(app, [("/healthz", {})])
    lines = [record.getMessage() for record in caplog.records if record.name == ACCESS_LOG.name]
    assert alive.status_code == 200 and len(lines) == 1 and "/healthz" in lines[0]
    assert ACCESS_LOG.handlers == []


@pytest.mark.usefixtures("bare_access_log")
def test_without_logging_configured_the_access_log_writes_to_stderr_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until an app made later finds logging set up: then its lines go there, and no longer to stderr too."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as under `digitgen serve` or a bare uvicorn
    generator = DigitGenerator.from_path(threads=1)
    create_app(generator, ServeSettings())
    (handler,) = ACCESS_LOG.handlers
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr and not ACCESS_LOG.propagate
    monkeypatch.setattr(logging.getLogger("digitgen"), "handlers", [logging.NullHandler()])  # the app's, on digitgen
    create_app(generator, ServeSettings())
    assert ACCESS_LOG.handlers == [] and ACCESS_LOG.propagate


def test_an_unexpected_error_is_a_500_in_json_with_the_request_id_and_cors(caplog: pytest.LogCaptureFixture) -> None:
    generator = DigitGenerator.from_path(threads=1)

    def fails_for_seven_digits(z: np.ndarray) -> None:
        if len(z) == 7:
            raise RuntimeError("a bug")

    before_each_model_call(generator, fails_for_seven_digits)
    origin = "https://digits.example"
    app = create_app(generator, ServeSettings(access_log=False, cors_origins=(origin,), batch_window_ms=0))
    headers = {"X-Request-ID": "req-7", "Origin": origin}
    with caplog.at_level("ERROR", logger="digitgen.serve"):
        failed, fine = _in_process(
            app, [("/generate?count=7&format=npz", headers), ("/generate?count=6&format=npz", headers)]
        )
    assert failed.status_code == 500 and fine.status_code == 200
    error = "internal error (RuntimeError); the server log has the details (id=req-7)"
    assert failed.json() == {"error": error}
    assert failed.headers["x-request-id"] == "req-7" and failed.headers["access-control-allow-origin"] == origin
    assert [r.getMessage() for r in caplog.records] == ["unexpected error in /generate (id=req-7)"]


def test_a_failed_request_makes_the_server_not_ready_until_a_warm_up_batch_runs_again() -> None:
    """A load balancer polling /readyz stops sending requests to a replica whose model fails, and sends them
    again once a warm-up batch (which /readyz starts) has run."""
    generator = DigitGenerator.from_path(threads=1)
    broken = threading.Event()

    def fails_while_broken(z: np.ndarray) -> None:
        if broken.is_set():
            raise RuntimeError("the GPU fell off the bus")

    before_each_model_call(generator, fails_while_broken)
    app = create_app(generator, ServeSettings(access_log=False, batch_window_ms=0))

    async def probes() -> list[httpx.Response]:
        async with app.router.lifespan_context(app), asgi_client(app) as client:
            async with asyncio.timeout(30):
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)
            broken.set()
            answers = [await client.get("/generate?count=3&format=npz")]
            answers += [await client.get("/readyz"), await client.get("/readyz")]  # the warm-up fails too
            broken.clear()
            async with asyncio.timeout(30):
                while (ready := await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)
            return [*answers, ready]

    failed, unready, still, ready = asyncio.run(probes())
    assert failed.status_code == 500
    assert unready.status_code == 503 and unready.json() == {
        "error": "not ready: a request failed (RuntimeError: the GPU fell off the bus); a warm-up batch runs again"
    }
    assert still.status_code == 503 and ready.json()["status"] == "ready"


def test_a_request_too_large_for_memory_is_refused_in_the_cli_words() -> None:
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False, max_count=10**13))
    (refused,) = _in_process(app, [("/generate?count=10000000000000&format=npz", {})])
    assert refused.status_code == 422
    assert refused.json() == {
        "error": "not enough memory: 10000000000000 digits do not fit in memory at once; ask for less"
    }


@pytest.mark.parametrize("query", ["count=20&format=npz", "count=1"], ids=["queued-for-a-slot", "micro-batched"])
def test_waiting_for_a_generation_slot_ends_at_the_time_limit(query: str) -> None:
    """With one generation running, a request waiting for it is refused once its time limit passes, as past the
    time limit whether it waits for a slot of its own (with the deadline, not the thread pool behind it) or in a
    micro-batch, whose batch waits for the slot."""
    generator = DigitGenerator.from_path(threads=1)
    running, release = threading.Event(), threading.Event()

    def held(z: np.ndarray) -> None:
        if len(z) == 20:
            running.set()
            release.wait(30)

    before_each_model_call(generator, held)
    app = create_app(generator, ServeSettings(access_log=False, max_in_flight=1, time_limit=0.5))

    async def requests() -> tuple[httpx.Response, httpx.Response]:
        async with asgi_client(app) as client:
            async with asyncio.timeout(30):
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)
            first = asyncio.create_task(client.get("/generate?count=20&format=npz&seed=1"))
            await asyncio.to_thread(running.wait, 30)
            try:
                queued = await asyncio.wait_for(client.get(f"/generate?{query}&seed=2"), 10)
            finally:
                release.set()
                await first
            return queued, await client.get("/metrics")

    queued, metrics = asyncio.run(requests())
    assert queued.status_code == 503 and queued.headers["retry-after"] == "1"
    assert queued.json() == {
        "error": "the request ran past this server's time limit of 0.5 s; "
        "ask for fewer digits, or retry when the server is less busy"
    }
    # the held request ran past the time limit too; neither counts as busy
    assert 'digitgen_requests_refused_total{reason="time_limit"} 2.0' in metrics.text
    assert 'digitgen_requests_refused_total{reason="busy"} 0.0' in metrics.text


def test_the_app_passes_the_lifespan_protocol_through_its_middleware() -> None:
    """An ASGI server's lifespan messages reach the app's own lifespan (warm-up, batcher) and come back."""
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False))
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


def test_an_error_after_the_response_started_is_raised_not_answered_twice(caplog: pytest.LogCaptureFixture) -> None:
    """Once the status line is sent, a 500 of its own cannot follow: the error is logged and goes to the
    ASGI server, which closes the connection. (A bare scope: no request id, no root path.)"""
    service = _Service(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False), Metrics())

    async def fails_midway(scope: dict, receive: object, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("the body failed")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def request() -> None:
        try:
            await _ServiceEntry(fails_midway, service, frozenset())(
                {"type": "http", "method": "GET", "path": "/"}, None, send
            )
        finally:
            await service.stop()

    with pytest.raises(RuntimeError, match="the body failed"), caplog.at_level("ERROR", logger="digitgen.serve"):
        asyncio.run(request())
    assert sent == [{"type": "http.response.start", "status": 200, "headers": []}]
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("digitgen.serve", "unexpected error in / (id=-)")]


@pytest.mark.parametrize(("window_ms", "batched"), [(0, 0), (0.5, 1), (2, 1)])
def test_a_batch_window_of_0_turns_micro_batching_off(window_ms: float, batched: int) -> None:
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False, batch_window_ms=window_ms))
    lone, metrics = _in_process(app, [("/generate?digit=3", {}), ("/metrics", {})])
    assert lone.status_code == 200
    assert f"digitgen_batch_requests_count {batched:.1f}" in metrics.text


def test_head_is_get_without_the_body_on_every_path(tmp_path: Path) -> None:
    """HTTP asks every server to answer HEAD as GET with no body: `curl -I`, link checkers and caches send it."""
    (tmp_path / "index.html").write_text("<html>the page</html>")
    (tmp_path / "generator.onnx").write_bytes(b"the page's model")
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False, web_dir=str(tmp_path)))
    paths = ["/generate?digit=3", "/generate?count=4&format=npz", "/generate?digit=12", "/healthz", "/", "/nope"]

    async def run() -> list[tuple[httpx.Response, httpx.Response]]:
        async with asgi_client(app) as client:
            return [(await client.get(path), await client.head(path)) for path in paths]

    for get, head in asyncio.run(run()):
        assert (head.status_code, head.content) == (get.status_code, b"")
        assert {**head.headers, "x-request-id": ""} == {**get.headers, "x-request-id": ""}
        assert int(head.headers["content-length"]) == len(get.content) > 0
    assert [get.status_code for get, _ in asyncio.run(run())] == [200, 200, 422, 200, 200, 404]


@pytest.mark.parametrize(
    ("path", "query", "status"), [("/generate", b"digit=3", 200), ("/generate", b"digit=30", 422), ("/nope", b"", 404)]
)
def test_head_sends_no_body_to_the_asgi_server(path: str, query: bytes, status: int) -> None:
    """The app leaves out the body itself: not every ASGI server drops it from a HEAD response."""
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False))
    sent: list[dict] = []
    scope = {"type": "http", "method": "HEAD", "path": path, "query_string": query, "headers": []}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app({**scope, "asgi": {"version": "3.0"}, "http_version": "1.1"}, receive, send))  # no root_path
    assert sent[0]["status"] == status and [m["body"] for m in sent[1:]] == [b""]


def test_head_reaches_a_mounted_apps_endpoints() -> None:
    parent = FastAPI()
    parent.mount("/digits", create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False)))

    async def run() -> list[httpx.Response]:
        async with asgi_client(parent) as client:
            return [await client.head(path) for path in ("/digits/healthz", "/digits/generate?digit=3")]

    assert [(head.status_code, head.content) for head in asyncio.run(run())] == [(200, b""), (200, b"")]


def test_other_methods_are_refused_in_words() -> None:
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False))

    async def run() -> list[httpx.Response]:
        async with asgi_client(app) as client:
            return [await client.post("/generate", content=b"x"), await client.delete("/healthz")]

    post, delete = asyncio.run(run())
    assert post.status_code == delete.status_code == 405 and post.headers["allow"] == "GET, HEAD"
    assert post.json() == {"error": "POST is not allowed on /generate; this server answers GET and HEAD"}
    assert delete.json() == {"error": "DELETE is not allowed on /healthz; this server answers GET and HEAD"}


def test_a_route_an_app_adds_is_refused_with_the_methods_it_answers() -> None:
    """Routes added to the app: a 405 names their own methods (Starlette's Allow), not those of the server's."""
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False))

    @app.post("/submit")
    async def submit() -> dict:
        return {"ok": 1}

    @app.get("/extra")
    async def extra() -> dict:
        return {"ok": 1}

    async def run() -> list[httpx.Response]:
        async with asgi_client(app) as client:
            return [await client.get("/submit"), await client.head("/extra"), await client.post("/generate")]

    get_submit, head_extra, post_generate = asyncio.run(run())
    assert (get_submit.status_code, get_submit.headers["allow"]) == (405, "POST")
    assert get_submit.json() == {"error": "GET is not allowed on /submit, which answers POST"}
    assert (head_extra.status_code, head_extra.headers["allow"]) == (405, "GET")  # FastAPI adds no HEAD
    assert head_extra.headers["content-length"] != "0"  # the refusal's length, its body dropped for HEAD
    assert post_generate.headers["allow"] == "GET, HEAD"  # the server's own endpoints as before


def test_a_mounted_app_counts_requests_by_its_own_endpoints() -> None:
    digits = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False))
    parent = FastAPI()
    parent.mount("/digits", digits)
    paths = ["/digits/healthz", "/digits/generate?digit=3", "/digits/nowhere", "/digits/redoc", "/digits/metrics"]
    answers = _in_process(parent, [(path, {}) for path in paths])
    assert [a.status_code for a in answers] == [200, 200, 404, 200, 200]
    assert answers[2].json() == {"error": "no endpoint /digits/nowhere; see /digits/docs"}  # the docs it serves
    metrics = answers[-1].text
    assert 'digitgen_requests_total{endpoint="/healthz",status="200"} 1.0' in metrics
    assert 'digitgen_requests_total{endpoint="/generate",status="200"} 1.0' in metrics
    assert 'digitgen_requests_total{endpoint="/redoc",status="200"} 1.0' in metrics  # every route of the app
    assert 'digitgen_requests_total{endpoint="other",status="404"} 1.0' in metrics  # only the unknown path
    assert 'endpoint="other",status="200"' not in metrics


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        # 3 + 3 + 2 fill 8 digits exactly; a request over the limit gets a call of its own
        ([3, 3, 2, 3, 9, 1], [[3, 3, 2], [3], [9], [1]]),
        # the count is of every request taken, each its own size: 1 + 1 + 2 + 4 = 8 leaves out the 3
        ([1, 1, 2, 4, 3], [[1, 1, 2, 4], [3]]),
    ],
)
def test_a_micro_batch_takes_waiting_requests_in_order_up_to_its_digit_limit(
    counts: list[int], expected: list[list[int]]
) -> None:
    async def batches() -> list[list[int]]:
        batcher = Batcher(None, 0.001, 8, None, None, None)  # type: ignore[arg-type]
        for count in counts:
            request = DigitsRequest((7,), count, 0, None, "grid")
            batcher._waiting.append(_Pending(request, asyncio.get_running_loop().create_future()))
        taken = []
        while batcher._waiting:
            taken.append([p.request.count for p in await batcher._collect()])
        return taken

    assert asyncio.run(batches()) == expected


def test_a_request_past_its_time_limit_takes_no_digits_of_a_micro_batch() -> None:
    """Its 8 digits would fill the batch and end the window at once: they are not counted, so the window waits
    for the next request, which shares the model call with the one live request waiting."""

    async def batch() -> list[int]:
        loop = asyncio.get_running_loop()
        batcher = Batcher(None, 0.5, 8, None, None, None)  # type: ignore[arg-type]

        def arrive(count: int) -> _Pending:
            pending = _Pending(DigitsRequest((7,), count, 0, None, "grid"), loop.create_future())
            batcher._waiting.append(pending)
            batcher._arrived.set()
            return pending

        arrive(8).digits.cancel()  # what the time limit does to a request's wait
        arrive(1)
        loop.call_later(0.05, arrive, 2)
        return [p.request.count for p in await batcher._collect()]

    assert asyncio.run(batch()) == [1, 2]


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (RuntimeError("a bug in the batcher"), "RuntimeError: a bug in the batcher"),
        (None, "RuntimeError: the micro-batcher returned"),
    ],
    ids=["raises", "returns"],
)
def test_a_batcher_that_ends_fails_its_request_and_leaves_the_rest_served_one_by_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception | None, words: str
) -> None:
    """A bug that ends the batcher's task answers the request it held with a 500 (that bug in the log) and
    must not leave later small requests waiting for their time limit."""

    async def ends_with_a_request_waiting(self: Batcher) -> None:
        async with asyncio.timeout(30):
            while not self._waiting:
                await asyncio.sleep(0.001)
        if error is not None:
            raise error

    monkeypatch.setattr(Batcher, "run", ends_with_a_request_waiting)
    generator = DigitGenerator.from_path(threads=1)
    app = create_app(generator, ServeSettings(access_log=False, time_limit=30))
    expected = encode(generate(generator, DigitsRequest((3,), 1, 9, None, "png")), "png")
    started = time.monotonic()
    with caplog.at_level("ERROR", logger="digitgen.serve"):
        ready, held, later = asyncio.run(
            _lifespan_responses(app, ["/generate?digit=3&seed=8", "/generate?digit=3&seed=9"])
        )
    assert (ready.status_code, held.status_code) == (200, 500)
    assert (later.status_code, later.content) == (200, expected)
    assert time.monotonic() - started < 15
    stopped, unexpected = caplog.records
    assert (stopped.name, stopped.getMessage()) == (
        "digitgen.serve",
        f"micro-batching stopped ({words}); small requests now run one by one",
    )
    assert unexpected.getMessage().startswith("unexpected error in /generate")
    assert (
        unexpected.exc_info is not None
        and f"{type(unexpected.exc_info[1]).__name__}: {unexpected.exc_info[1]}" == words
    )


def test_list_headers_sent_as_several_fields_count_whole_and_no_path_redirects() -> None:
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False))

    async def run() -> list[httpx.Response]:
        async with asgi_client(app) as client:
            two_accepts = [("accept", "text/html"), ("accept", "application/json")]
            json_answer = await client.get("/generate?seed=4", headers=two_accepts)
            tag = json_answer.headers["etag"]
            two_tags = [("if-none-match", '"elsewhere"'), ("if-none-match", tag), *two_accepts]
            return [json_answer, await client.get("/generate?seed=4", headers=two_tags), await client.get("/generate/")]

    json_answer, not_modified, slash = asyncio.run(run())
    assert (json_answer.status_code, json_answer.headers["content-type"]) == (200, "application/json")
    assert not_modified.status_code == 304
    assert (slash.status_code, slash.json()) == (404, {"error": "no endpoint /generate/; see /docs"})


def test_a_hosts_own_cancellation_goes_on_up(caplog: pytest.LogCaptureFixture) -> None:
    """Only the server's giving up as it stops is answered here (a 503, tested with uvicorn in test_serve.py):
    a host app's timeout around this one must see its cancellation, not a response."""
    generator = DigitGenerator.from_path(threads=1)
    before_each_model_call(generator, lambda z: time.sleep(0.3))
    app = create_app(generator, ServeSettings(access_log=False))

    async def run() -> None:
        async with asgi_client(app) as client, asyncio.timeout(0.1):
            await client.get("/generate?count=300&format=npz")

    with caplog.at_level("WARNING", logger="digitgen.serve"), pytest.raises(TimeoutError):
        asyncio.run(run())
    assert "cut off" not in caplog.text


def test_the_page_rewrites_only_its_range_refusals(tmp_path: Path) -> None:
    """A folder's own 404 page goes as it is, Range header or not; a Range it cannot serve is a JSON refusal; one in
    another unit than bytes is ignored."""
    (tmp_path / "404.html").write_text("<p>not here</p>")
    (tmp_path / "model.onnx").write_bytes(bytes(100))

    async def answers() -> list[httpx.Response]:
        async with asgi_client(PageFiles(directory=tmp_path, html=True)) as client:
            return [
                await client.get("/missing", headers={"Range": "bytes=0-1"}),
                await client.get("/model.onnx", headers={"Range": "bytes=500-"}),
                await client.get("/model.onnx", headers={"Range": "bytes=10-19"}),
                await client.get("/model.onnx", headers={"Range": "bytes=abc"}),
                await client.get("/model.onnx", headers={"Range": "abc"}),
                await client.get("/model.onnx", headers={"Range": "items=0-1"}),
            ]

    missing, past_the_end, part, unreadable, malformed, other_unit = asyncio.run(answers())
    # a unit other than bytes is ignored (RFC 9110, 14.2: a server must): the whole file
    assert other_unit.status_code == 200 and other_unit.content == bytes(100)
    for refused in (past_the_end, unreadable, malformed):  # the JSON's own type and length, not the plain text's
        assert refused.headers.get_list("content-type") == ["application/json"]
        assert refused.headers.get_list("content-length") == [str(len(refused.content))]
    assert malformed.status_code == 400 and malformed.json() == {
        "error": "cannot serve this Range header (Malformed range header); send bytes=START-END, or leave Range out"
    }
    assert unreadable.status_code == 400 and unreadable.json() == {
        "error": "cannot serve this Range header (range must be requested); send bytes=START-END, or leave Range out"
    }
    assert (
        past_the_end.headers["content-range"] == "bytes */100" and past_the_end.headers["cache-control"] == "no-store"
    )
    assert missing.status_code == 404 and missing.text == "<p>not here</p>"
    assert past_the_end.status_code == 416 and past_the_end.json()["error"].startswith(
        "the Range asked for covers no byte of the file (100 bytes)"
    )
    assert part.status_code == 206 and part.content == bytes(10)


def test_the_page_refuses_an_if_match_that_names_no_etag_of_its_file(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(bytes(100))
    (tmp_path / "404.html").write_text("<p>not here</p>")

    async def answers() -> list[httpx.Response]:
        async with asgi_client(PageFiles(directory=tmp_path, html=True)) as client:
            tag = (await client.get("/model.onnx")).headers["etag"]
            return [
                await client.get("/model.onnx", headers={"If-Match": tag}),
                await client.get("/model.onnx", headers={"If-Match": '"other"'}),
                await client.get("/model.onnx", headers={"If-Match": '"other"', "If-None-Match": tag}),
                await client.get("/missing", headers={"If-Match": '"other"'}),  # the 404 it would be, ETag and all
            ]

    matched, failed, failed_first, missing = asyncio.run(answers())
    assert matched.status_code == 200 and matched.content == bytes(100)
    tag = matched.headers["etag"]
    for refused in (failed, failed_first):  # If-Match is checked before If-None-Match's 304
        assert refused.status_code == 412
        assert refused.json() == {"error": f"If-Match names no ETag of this file, which is {tag}"}
    assert missing.status_code == 404 and missing.text == "<p>not here</p>" and "etag" in missing.headers


def test_the_page_reads_if_none_match_over_several_fields_as_one_list(tmp_path: Path) -> None:
    """As /generate reads it (RFC 9110, 5.3): the first field alone had decided, and "*" in a list was no match."""
    (tmp_path / "model.onnx").write_bytes(bytes(100))

    async def answers() -> list[httpx.Response]:
        async with asgi_client(PageFiles(directory=tmp_path, html=True)) as client:
            tag = (await client.get("/model.onnx")).headers["etag"]
            return [
                await client.get("/model.onnx", headers=[("If-None-Match", '"other"'), ("If-None-Match", tag)]),
                await client.get("/model.onnx", headers={"If-None-Match": f'"other", W/{tag}'}),
                await client.get("/model.onnx", headers={"If-None-Match": '"other", *'}),
                await client.get("/model.onnx", headers=[("If-None-Match", '"other"'), ("If-None-Match", '"more"')]),
            ]

    *held, changed = asyncio.run(answers())
    assert [answer.status_code for answer in held] == [304, 304, 304] and changed.status_code == 200


def test_the_page_reads_only_valid_dates_in_its_conditional_headers(tmp_path: Path) -> None:
    """If-Modified-Since gives a 304 only for one valid HTTP-date at or after the file's last change, and gives way
    to If-None-Match; If-Unmodified-Since before it is a 412, and gives way to If-Match; an error page has none."""
    (tmp_path / "model.onnx").write_bytes(bytes(100))
    (tmp_path / "404.html").write_text("<p>not here</p>")
    changed = 1_795_000_000  # Wed, 18 Nov 2026 11:06:40 GMT
    for name in ("model.onnx", "404.html"):
        os.utime(tmp_path / name, (changed, changed))
    before, at, after = (
        "Wed, 18 Nov 2026 11:06:39 GMT",
        "Wed, 18 Nov 2026 11:06:40 GMT",
        "Sat, 21 Nov 2026 00:00:00 GMT",
    )
    asks = {
        "at": {"If-Modified-Since": at},
        "after": {"If-Modified-Since": after},
        "after, RFC 850": {"If-Modified-Since": "Saturday, 21-Nov-26 00:00:00 GMT"},
        "after, asctime": {"If-Modified-Since": "Sat Nov 21 00:00:00 2026"},
        "before": {"If-Modified-Since": before},
        "no such day": {"If-Modified-Since": "Mon, 99 Nov 2026 00:00:00 GMT"},
        "not in GMT": {"If-Modified-Since": "Sat, 21 Nov 2026 00:00:00 +0000"},
        "two dates": {"If-Modified-Since": f"{after}, {after}"},
        "another ETag first": {"If-None-Match": '"other"', "If-Modified-Since": after},
        "unmodified since before": {"If-Unmodified-Since": before},
        "unmodified since at": {"If-Unmodified-Since": at},
        "unmodified since no such day": {"If-Unmodified-Since": "Mon, 99 Nov 2026 00:00:00 GMT"},
        "If-Match first": {"If-Match": "*", "If-Unmodified-Since": before},
    }

    async def answers() -> tuple[dict[str, int], httpx.Response, httpx.Response, httpx.Response]:
        async with asgi_client(PageFiles(directory=tmp_path, html=True)) as client:
            statuses = {
                name: (await client.get("/model.onnx", headers=headers)).status_code for name, headers in asks.items()
            }
            tag = (await client.get("/model.onnx")).headers["etag"]
            refused_first = await client.get(
                "/model.onnx", headers={"If-Unmodified-Since": before, "If-None-Match": tag}
            )
            missing = await client.get("/missing")
            missing_again = await client.get(
                "/missing", headers={"If-None-Match": missing.headers["etag"], "If-Unmodified-Since": before}
            )
            return statuses, refused_first, missing, missing_again

    statuses, refused_first, missing, missing_again = asyncio.run(answers())
    assert statuses == {
        "at": 304, "after": 304, "after, RFC 850": 304, "after, asctime": 304, "before": 200, "no such day": 200,
        "not in GMT": 200, "two dates": 200, "another ETag first": 200, "unmodified since before": 412,
        "unmodified since at": 200, "unmodified since no such day": 200, "If-Match first": 200,
    }  # fmt: skip
    assert (refused_first.status_code, refused_first.json()) == (
        412,
        {"error": f"the file has changed since If-Unmodified-Since ({before}): it was last modified {at}"},
    )
    assert missing_again.status_code == 404 and missing_again.text == missing.text == "<p>not here</p>"


def test_a_page_file_linked_from_outside_its_folder_is_refused_as_the_file_server_would_not_serve_it(
    tmp_path: Path,
) -> None:
    page, outside = tmp_path / "page", tmp_path / "elsewhere"
    page.mkdir(), outside.mkdir()
    (page / "index.html").write_text("<html>the page</html>")
    (outside / "model.onnx").write_bytes(b"a model")
    (page / "generator.onnx").symlink_to(outside / "model.onnx")
    with pytest.raises(ServeConfigError) as refused:
        ServeSettings(web_dir=str(page))
    assert str(refused.value) == (
        f"{page / 'generator.onnx'} links to {outside / 'model.onnx'}, outside {page}: the server serves no file from "
        "outside the page's folder; copy it in"
    )
    (page / "generator.onnx").unlink()
    (page / "model.onnx").write_bytes(b"a model")
    (page / "generator.onnx").symlink_to(page / "model.onnx")  # a link inside the folder is served
    # any other file or folder linked in from outside, anywhere but in a dot-folder (not served): said at start-up,
    # not answered later as "no endpoint"
    (page / ".cache").mkdir()
    (page / ".cache" / "old.onnx").symlink_to(outside / "model.onnx")
    (page / "models").mkdir()
    (page / "models" / "loop").symlink_to("loop")  # inside, and served as no file: no reason to refuse
    for linked in (page / "models" / "custom.onnx", page / "assets"):
        linked.symlink_to(outside / "model.onnx" if linked.suffix else outside)
        with pytest.raises(ServeConfigError, match=f"^{re.escape(str(linked))} links to .*; copy it in$"):
            ServeSettings(web_dir=str(page))
        linked.unlink()
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False, web_dir=str(page)))

    async def served() -> bytes:
        async with asgi_client(app) as client:
            return (await client.get("/generator.onnx")).content

    assert asyncio.run(served()) == b"a model"


def test_the_page_serves_no_dotfile_nor_anything_in_a_dot_folder(tmp_path: Path) -> None:
    """A page folder may hold ``.env`` or ``.git/``: they are answered as missing files are, the folder's 404 page."""
    (tmp_path / "404.html").write_text("<p>not here</p>")
    (tmp_path / ".env").write_text("TOKEN=secret")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[remote]")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / ".hidden.js").write_text("secret()")
    (tmp_path / "assets" / "page.js").write_text("shown()")

    async def answers() -> list[httpx.Response]:
        async with asgi_client(PageFiles(directory=tmp_path, html=True)) as client:
            paths = ("/.env", "/.git/config", "/assets/.hidden.js", "/assets/../.env", "/assets/page.js", "/.")
            return [await client.get(path) for path in paths]

    *hidden, shown, root = asyncio.run(answers())
    for answer in hidden:
        assert answer.status_code == 404 and answer.text == "<p>not here</p>"
    assert shown.status_code == 200 and shown.text == "shown()"
    assert root.status_code == 404  # the folder itself is no dotfile: no index.html here, so its 404 page
    assert root.text == "<p>not here</p>"


def test_a_page_file_the_server_cannot_read_is_answered_as_missing_and_named_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop of links, or a file it may not open, is the operator's to fix: never a 500, a 401 or a 200 cut off
    after its length was sent."""
    (tmp_path / "404.html").write_text("<p>not here</p>")
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    (tmp_path / "noread.txt").write_text("private")
    (tmp_path / "read.txt").write_text("shown")

    def open_as_another_user(file: str, *args: object, **kwargs: object) -> object:
        if os.path.basename(file) == "noread.txt":  # root reads any file: the refusal another user would get
            raise PermissionError(errno.EACCES, "Permission denied", file)
        return open(file, *args, **kwargs)

    monkeypatch.setattr(page, "open", open_as_another_user, raising=False)

    async def answers() -> list[httpx.Response]:
        async with asgi_client(PageFiles(directory=tmp_path, html=True)) as client:
            paths = ("/loopA", "/loopA/x", "/loopA/%1b%5b2J", "/noread.txt", "/read.txt", "/" + "x" * 300)
            return [await client.get(path) for path in paths]

    with caplog.at_level("WARNING", logger="digitgen.serve"):
        *unreadable, shown, too_long = asyncio.run(answers())
    for answer in (*unreadable, too_long):
        assert answer.status_code == 404 and answer.text == "<p>not here</p>"
    assert shown.status_code == 200 and shown.text == "shown"
    assert [r.getMessage() for r in caplog.records] == [  # a client's over-long name is no fault of the folder's
        "the page's loopA cannot be read (Too many levels of symbolic links)",
        "the page's loopA/x cannot be read (Too many levels of symbolic links)",
        "the page's loopA/\\x1b[2J cannot be read (Too many levels of symbolic links)",  # a client's escape, escaped
        "the page's noread.txt cannot be read (Permission denied)",
    ]


def test_the_page_redirects_a_folder_without_its_slash_relatively_whatever_the_host(tmp_path: Path) -> None:
    """Starlette would redirect to http://HOST/.../ with the request's Host header: an address anyone can set."""
    (tmp_path / "sub:folder").mkdir()
    for folder in (tmp_path, tmp_path / "sub:folder"):
        (folder / "index.html").write_text("<html>the page</html>")
    (tmp_path / "generator.onnx").write_bytes(b"the page's model")
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False, web_dir=str(tmp_path)))
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    for path, query in (("/.", b""), ("/sub:folder", b"lang=en&x=%2F")):
        scope = {"type": "http", "method": "GET", "path": path, "query_string": query, "root_path": ""}
        scope |= {"headers": [(b"host", b"evil.example")], "asgi": {"version": "3.0"}, "http_version": "1.1"}
        asyncio.run(app(scope, receive, send))
    locations = [dict(m["headers"]).get(b"location") for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [307, 307]
    assert locations == [b"././", b"./sub%3Afolder/?lang=en&x=%2F"]  # the query kept


# --- the same words as the CLI --------------------------------------------------------------------

SHARED_REFUSALS = [
    (["-n", "0"], "count=0"),
    (["-n", "ten"], "count=ten"),
    (["-n", "1_0"], "count=1_0"),
    (["--seed", "-1"], "seed=-1"),
    (["--seed", str(2**64)], f"seed={2**64}"),
    (["--seed", "\u0663"], "seed=\u0663"),  # an Arabic-Indic 3, which int() reads
    (["--digit", "10"], "digit=10"),
    (["--digit", "-1"], "digit=-1"),
    (["--digit", "abc"], "digit=abc"),
    (["--digits", "1,x"], "digits=1,x"),
    (["--digits", "12,3,15"], "digits=12,3,15"),
    (["--truncation", "0.05"], "truncation=0.05"),
    (["--truncation", "nan"], "truncation=nan"),
    (["--truncation", "1_0"], "truncation=1_0"),
]


@pytest.mark.parametrize(("cli_args", "query"), SHARED_REFUSALS, ids=[query for _, query in SHARED_REFUSALS])
def test_the_server_refuses_a_parameter_in_the_words_of_the_cli(
    tmp_path: Path, cli_args: list[str], query: str
) -> None:
    """The HTTP API's refusal of a bad value is the sentence `digitgen generate` says for the same value (the CLI
    adds which option it was)."""
    from click.testing import CliRunner

    from digitgen.cli import main
    from digitgen.runtime.errors import InvalidRequestError
    from digitgen.serve.params import parse_request

    name, value = query.split("=", 1)
    with pytest.raises(InvalidRequestError) as refused:
        parse_request([(name, value)], None, DigitGenerator.from_path(threads=1), 10_000)
    result = CliRunner().invoke(main, ["generate", "--out", str(tmp_path / "out"), *cli_args])
    assert result.exit_code != 0 and len(result.output.splitlines()) == 1
    assert str(refused.value) in result.output, (str(refused.value), result.output)
    assert not (tmp_path / "out").exists()


def test_a_clients_watch_is_one_task_made_on_demand_and_stopped() -> None:
    """No ``receive`` call for a request that never waits (its body is the app's to read), one for a watched one."""

    async def watch() -> tuple[bool, int, bool]:
        calls = 0
        never = asyncio.Event()

        async def receive() -> dict:
            nonlocal calls
            calls += 1
            await never.wait()
            return {"type": "http.disconnect"}

        client = _Client(receive)
        await asyncio.sleep(0)
        unwatched = calls == 0
        client.gone(), client.abandoned()
        await asyncio.sleep(0)
        client.stop_watching()
        await asyncio.sleep(0)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        return unwatched, calls, not others

    assert asyncio.run(watch()) == (True, 1, True)


@pytest.mark.parametrize(
    ("messages", "gone", "read"),
    [
        ([{"type": "http.request", "body": b"", "more_body": False}] * 1000, False, 2),  # never waits: left unwatched
        ([{"type": "http.request", "body": b""}] * 1000, False, 2),  # more_body left out: False, as ASGI says
        ([{"type": "http.request", "body": b"ab", "more_body": True}] * 3 + [{"type": "http.disconnect"}], True, 4),
        ([{"type": "http.request", "body": b"", "more_body": False}, {"type": "http.disconnect"}], True, 2),
    ],
)
def test_a_clients_watch_reads_the_body_then_waits_for_the_disconnect(
    messages: list[dict], gone: bool, read: int
) -> None:
    """A server whose ``receive`` answers at once after the body has ended, rather than wait for the disconnect as
    ASGI asks, had the watch spin without ever yielding the event loop: every request on it hung."""

    async def watch() -> tuple[bool, int]:
        queue = iter(messages)
        calls = 0

        async def receive() -> dict:
            nonlocal calls
            calls += 1
            return next(queue)  # answers at once: past the 1,000th message, StopIteration

        client = _Client(receive)
        seen = client.gone()
        await asyncio.sleep(0.01)
        return seen.is_set(), calls

    assert asyncio.run(watch()) == (gone, read)


def test_a_request_generated_on_a_thread_leaves_no_watch_behind() -> None:
    """Under a server whose ``receive`` waits until the connection closes (as ASGI allows), a finished request's
    watch of its client would wait for ever, one task a request."""
    app = create_app(DigitGenerator.from_path(threads=1), ServeSettings(access_log=False))
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/generate",
        "query_string": b"count=40&format=npz",
        "headers": [],
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
    }
    sent: list[dict] = []

    async def serve_one() -> list[asyncio.Task]:
        held = asyncio.Event()
        asked = 0

        async def receive() -> dict:  # a server that answers only once the connection closes, which it never does
            nonlocal asked
            asked += 1
            if asked == 1:
                return {"type": "http.request", "body": b"", "more_body": False}
            await held.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)
        await asyncio.sleep(0)
        return [task for task in asyncio.all_tasks() if "_until_disconnected" in repr(task.get_coro())]

    assert asyncio.run(serve_one()) == []
    assert sent[0]["status"] == 200
