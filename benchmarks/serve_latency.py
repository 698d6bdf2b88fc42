"""Concurrency 1: `digitgen serve` beside variants that change where and how its one-digit model call runs.

    python benchmarks/serve_latency.py --seconds 3 --rounds 5

At concurrency 1 a request's model call, its noise, its PNG and the HTTP stack run one after the other,
so the share of the bare endpoint is bounded by the sum. Each variant below tries one way to shorten that
sum without changing a byte of the responses; all run side by side with the bare endpoint, in rotated
order, each round's share against that round's bare figure. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe
from benchmarks.serve import BARE, BARE_APP, load, running, serve_command

PNG = "/generate?seed={seed}&digit=7"
# each variant: a script run as `python -c SCRIPT PORT` (no braces: the port is filled in with str.format),
# serving with the defaults (access log off) after the change named in VARIANTS
PREAMBLE = """
import os, queue, selectors, sys, threading, time
import onnxruntime as ort
"""
SERVE = """
from digitgen.runtime.generator import DigitGenerator
from digitgen.serve.app import ServeSettings
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each load run")
    parser.add_argument("--rounds", type=int, default=5, help="load runs of each server")
    args = parser.parse_args()
    commands = {BARE: ([sys.executable, "-c", BARE_APP, "{port}"], "/constant", "/constant?seed={seed}")}
    for name, command in VARIANTS.items():
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
