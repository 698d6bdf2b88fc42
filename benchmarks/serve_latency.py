"""Concurrency 1: `digitgen serve` beside variants that change where and how its one-digit model call runs.

    python benchmarks/serve_latency.py --seconds 3 --rounds 5
    python benchmarks/serve_latency.py --in-process --rounds 3
    python benchmarks/serve_latency.py --models narrow.onnx   # other models beside the shipped one, defaults

At concurrency 1 a request's model call, its noise, its PNG and the HTTP stack run one after the other,
so the share of the bare endpoint is bounded by the sum. Each variant below tries one way to shorten that
sum without changing a byte of the responses; all run side by side with the bare endpoint, in rotated
order, each round's share against that round's bare figure. Traffic goes to 127.0.0.1 only.

``--in-process`` drives the app through ASGI instead (no sockets, no HTTP parsing) with the model call
replaced by stand-ins of known cost, to see what a call costs the rest of the request beyond its own time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe
from benchmarks.serve import BARE, BARE_APP, load, running, serve_command
from digitgen.runtime.generator import DigitGenerator

PNG = "/generate?seed={seed}&digit=7"
# each variant: a script run as `python -c SCRIPT PORT` (no braces: the port is filled in with str.format),
# serving with the defaults (access log off) after the change named in VARIANTS
PREAMBLE = """
import os, queue, selectors, sys, threading, time
import onnxruntime as ort
"""
SERVE = """
from digitgen.runtime.generator import DigitGenerator
from digitgen.serve import ServeSettings
from digitgen.serve.run import ServerOptions, serve
generator = DigitGenerator.from_path(threads=THREADS)
MODEL_CALL
serve(ServerOptions(port=int(sys.argv[1]), settings=ServeSettings(access_log=False)), generator)
"""
# onnxruntime's pool stops spinning as soon as a call returns, so it does not take the client's core after it
STOP_SPINNING = """
class Options(ort.SessionOptions):
    def __init__(self):
        super().__init__()
        self.add_session_config_entry("session.force_spinning_stop", "1")
ort.SessionOptions = Options
"""
# the model call on a thread of its own, pinned to the second core (the event loop pinned to the first),
# the loop waiting for it: the loop's caches keep its own working set, the model's weights stay on the other core
PINNED_MODEL_THREAD = """
run, calls = generator.run, queue.SimpleQueue()
def model_thread():
    os.sched_setaffinity(0, (1,))
    while True:
        args, done, result = calls.get()
        try:
            result.append(run(*args))
        except BaseException as exc:
            result.append(exc)
        done.release()
threading.Thread(target=model_thread, daemon=True).start()
def run_on_model_thread(*args):
    done, result = threading.Lock(), []
    done.acquire()
    calls.put((args, done, result))
    done.acquire()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]
generator.run = run_on_model_thread
os.sched_setaffinity(0, (0,))
"""
# the event loop polls its sockets for up to 300 us before it sleeps, so the next request need not wake it
POLLING_LOOP = """
class Polling(selectors.EpollSelector):
    def select(self, timeout=None):
        until = time.perf_counter() + (3e-4 if timeout is None else min(3e-4, timeout))
        while time.perf_counter() < until:
            ready = super().select(0)
            if ready:
                return ready
        return super().select(timeout)
selectors.DefaultSelector = Polling
"""


def variant_script(threads: int, before: str = "", model_call: str = "") -> str:
    return PREAMBLE + before + SERVE.replace("THREADS", str(threads)).replace("MODEL_CALL", model_call)


VARIANTS = {
    "defaults (1 onnxruntime thread)": serve_command(),
    "2 onnxruntime threads": serve_command("--threads", "2"),
    "2 onnxruntime threads, spinning stopped after each call": variant_script(2, STOP_SPINNING),
    "model call on a thread pinned to the other core": variant_script(1, model_call=PINNED_MODEL_THREAD),
    "event loop polls 300 us before sleeping": variant_script(1, POLLING_LOOP),
}


ModelCall = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _flat(z: np.ndarray) -> np.ndarray:
    """The model-free anchor's picture: what the stand-ins return after their own work."""
    return np.full((len(z), 1, 28, 28), 0.5, np.float32)


def _spin(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def _one_matmul(megabytes: int) -> ModelCall:
    """An onnxruntime call of one MatMul over ``megabytes`` of weights (the model's size, few nodes)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).standard_normal((64, megabytes * 4096), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["z", "w"], ["y"])],
        "one_matmul",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weights.shape[1]])],
        [numpy_helper.from_array(weights, "w")],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda z, labels: (session.run(None, {"z": z}), _flat(z))[1]


def stand_ins() -> dict[str, ModelCall | None]:
    """The model calls compared in-process; ``None`` is the generator's own."""
    from digitgen.runtime.generator import DigitGenerator

    data = np.ones(512 * 1024, np.float32)  # 2 MB, the size of the model's weights
    digit = DigitGenerator.from_path(threads=1).run(np.ones((1, 64), np.float32), np.array([7]))
    return {
        "no model call (a constant picture)": lambda z, labels: _flat(z),
        "no model call (one real digit, made before)": lambda z, labels: np.repeat(digit, len(z), axis=0),
        "a sum over a 2 MB array": lambda z, labels: (data.sum(), _flat(z))[1],
        "400 us of spinning": lambda z, labels: (_spin(400e-6), _flat(z))[1],
        "onnxruntime, one MatMul over 2 MB of weights": _one_matmul(2),
        "the model": None,
    }


async def asgi_requests(app: Callable, count: int, first_seed: int) -> list[float]:
    """Seconds of each of ``count`` one-digit PNG requests sent to ``app`` through ASGI after its lifespan starts
    (one seed each, so no cache answers); every response must be a 200."""
    startup: asyncio.Queue = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    started = asyncio.Event()

    async def lifespan_send(message: dict) -> None:
        started.set()

    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, startup.get,
                                       lifespan_send))  # fmt: skip
    await started.wait()
    await asyncio.sleep(0.5)  # the warm-up batch

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    seconds = []
    for seed in range(first_seed, first_seed + count):
        query = f"seed={seed}&digit=7".encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
                 "path": "/generate", "raw_path": b"/generate", "query_string": query, "root_path": "",
                 "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "state": {}}  # fmt: skip
        started_at = time.perf_counter()
        await app(scope, receive, send)
        seconds.append(time.perf_counter() - started_at)
    await startup.put({"type": "lifespan.shutdown"})
    await lifespan
    if set(statuses) != {200}:
        raise SystemExit(f"responses other than 200: {sorted(set(statuses))}")
    return seconds


def _alone_us(call: ModelCall, repeats: int = 2000) -> float:
    z, labels = np.zeros((1, 64), np.float32), np.array([7])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call(z, labels)
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times[repeats // 10 :])


def _timed(call: ModelCall, seconds: list[float]) -> ModelCall:
    def timed(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        images = call(z, labels)
        seconds.append(time.perf_counter() - started)
        return images

    return timed


def in_process_table(requests: int, rounds: int) -> None:
    """Each stand-in's request time in-process, its call alone and inside the server, and what the rest of the
    request took beyond the request without a call."""
    from digitgen.runtime.generator import DigitGenerator
    from digitgen.serve import ServeSettings, create_app

    calls = stand_ins()
    alone = {name: _alone_us(call or DigitGenerator.from_path(threads=1).run) for name, call in calls.items()}
    request_us: dict[str, list[float]] = {name: [] for name in calls}
    inside: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds):
        for name, call in calls.items():
            generator = DigitGenerator.from_path(threads=1)
            generator.run = _timed(call or generator.run, inside[name])
            app = create_app(generator, ServeSettings(access_log=False))
            seconds = asyncio.run(asgi_requests(app, requests, (round_ + 1) * 10**6))
            request_us[name].append(1e6 * statistics.median(seconds[requests // 10 :]))
    print(f"machine: {describe()}; python {sys.version.split()[0]}; in-process, {requests} requests a round")
    print("| model call | request, us (rounds) | the call alone, us | the call in the server, us | the rest, "
          "beyond a request without a call, us |")  # fmt: skip
    print("|---|---|---|---|---|")
    base = statistics.median(request_us[next(iter(calls))]) - 1e6 * statistics.median(inside[next(iter(calls))])
    for name, times in request_us.items():
        median, call_us = statistics.median(times), 1e6 * statistics.median(inside[name])
        spread = f"{min(times):.0f}-{max(times):.0f}"
        rest = median - call_us - base
        print(f"| {name} | {median:.0f} ({spread}) | {alone[name]:.0f} | {call_us:.0f} | {rest:+.0f} |")


def model_variants(models: list[str]) -> dict[str, list[str]]:
    """The shipped model and each of ``models`` served with the defaults, each named with its one-digit call's
    time alone (``generate(1)`` on one thread, the median of five loops of 500 calls)."""
    variants = {}
    for model in [None, *models]:
        generator = DigitGenerator.from_path(model, threads=1)
        loops = []
        for _ in range(5):
            started = time.perf_counter()
            for seed in range(500):
                generator.generate(1, seed=seed)
            loops.append((time.perf_counter() - started) / 500)
        name = f"{model or 'the shipped model'} (generate(1) alone: {1e6 * statistics.median(loops):.0f} us)"
        variants[name] = serve_command(*(["--generator", model] if model else []))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each load run")
    parser.add_argument("--rounds", type=int, default=5, help="load runs of each server")
    parser.add_argument("--in-process", action="store_true", help="the ASGI app in-process, with stand-in model calls")
    parser.add_argument("--requests", type=int, default=3000, help="requests a round, with --in-process")
    parser.add_argument(
        "--models", nargs="+", metavar="ONNX", help="serve these models (and the shipped one) with the defaults instead"
    )
    args = parser.parse_args()
    if args.in_process:
        in_process_table(args.requests, args.rounds)
        return
    variants = VARIANTS if not args.models else model_variants(args.models)
    commands = {BARE: ([sys.executable, "-c", BARE_APP, "{port}"], "/constant", "/constant?seed={seed}")}
    for name, command in variants.items():
        command = command if isinstance(command, list) else [sys.executable, "-c", command, "{port}"]
        commands[name] = (command, "/readyz", PNG)
    print(f"machine: {describe()}; python {sys.version.split()[0]}; concurrency 1")
    with ExitStack() as servers:
        ports = {
            name: servers.enter_context(running(command, ready))[0] for name, (command, ready, _) in commands.items()
        }
        names = list(ports)
        for name in names:
            load(ports[name], commands[name][2], 1, 1)
        rates: dict[str, list[float]] = {name: [] for name in names}
        shares: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                rates[name].append(load(ports[name], commands[name][2], 1, args.seconds)["rps"])
            for name in names:
                shares[name].append(rates[name][-1] / rates[BARE][-1])
    print("| server, one-digit PNG, concurrency 1 | requests/s, median | share of bare, median (rounds) |")
    print("|---|---|---|")
    for name in names:
        spread = f"{min(shares[name]):.1%}-{max(shares[name]):.1%}"
        print(f"| {name} | {statistics.median(rates[name]):,.0f} | {statistics.median(shares[name]):.1%} ({spread}) |")


if __name__ == "__main__":
    main()
