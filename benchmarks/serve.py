"""`digitgen serve` under load, beside its two anchors measured in the same run.

    python benchmarks/serve.py --seconds 3 --rounds 3 --soak 100000   # the README's tables (about 10 minutes)
    python benchmarks/serve.py --batching-only   # the micro-batching rows alone

Anchors: a bare FastAPI/uvicorn endpoint that returns a constant PNG-sized body (the stack's own
ceiling), the library's in-process ``generate`` rate, and (one-digit rows) the server with its model
call replaced by a constant picture (the server's own work without the model). The load generator
is an asyncio client with keep-alive connections in this process; every request carries its own
seed, so no cache can stand in for the model. Traffic goes to 127.0.0.1 only, bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from digitgen.runtime.generator import DigitGenerator  # noqa: E402

HOST = "127.0.0.1"
SEEDS = itertools.count(int(time.time() * 1000) % 10**9)  # one run's requests never repeat a seed
LENGTH = re.compile(rb"content-length: *(\d+)", re.IGNORECASE)
BARE_APP = """
import sys
import uvicorn
from fastapi import FastAPI, Response

app = FastAPI()
BODY = bytes(300)

@app.get("/constant")
async def constant() -> Response:
    return Response(BODY, media_type="image/png")

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""
# `digitgen serve` with its defaults and the model call replaced by a constant picture: what the server's
# own work (HTTP, parameters, noise, PNG encoding) costs without the model
MODEL_FREE_APP = """
import sys
import numpy as np
from digitgen.runtime.generator import DigitGenerator
from digitgen.serve import ServeSettings
from digitgen.serve.run import ServerOptions, serve

generator = DigitGenerator.from_path(threads=1)
generator.run = lambda z, labels: np.full((len(z), 1, 28, 28), 0.5, np.float32)
serve(ServerOptions(port=int(sys.argv[1]), settings=ServeSettings(access_log=False)), generator)
"""


BARE = "anchor: bare FastAPI endpoint, constant body"
MODEL_FREE = "anchor: digitgen serve defaults, model call replaced by a constant picture"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def running(command: list[str], ready: str) -> Iterator[tuple[int, subprocess.Popen]]:
    """Start a server (``{port}`` filled in), wait until ``ready`` answers 200, stop it with SIGTERM."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([part.format(port=port) for part in command], stdout=log, stderr=log)
        yield from _serve_until_done(process, port, ready, log)


def _serve_until_done(
    process: subprocess.Popen, port: int, ready: str, log: IO[bytes]
) -> Iterator[tuple[int, subprocess.Popen]]:
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://{HOST}:{port}{ready}", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"server did not start: {log.read().decode(errors='replace')}")
            time.sleep(0.05)
        yield port, process
    finally:
        process.terminate()
        process.wait(60)


async def _connection(
    port: int, paths: Iterator[str], stop_at: float, latencies: list[float], statuses: Counter
) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for path in paths:
            if time.perf_counter() > stop_at:
                return
            started = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(LENGTH.search(head).group(1)))
            status = int(head[9:12])
            statuses[status] += 1
            if status == 200:  # a quick refusal is not throughput
                latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


def load(port: int, template: str, concurrency: int, seconds: float, limit: int | None = None) -> dict:
    """``concurrency`` keep-alive connections send ``template`` (``{seed}`` filled, one seed per request, never
    one sent before in this process) for ``seconds`` or until ``limit`` requests; requests/s, p50 and p99
    latency of the 200 responses, and how many were not 200."""
    paths = (
        (template.format(seed=next(SEEDS)) for _ in itertools.count())
        if limit is None
        else (template.format(seed=next(SEEDS)) for _ in range(limit))
    )
    latencies: list[float] = []
    statuses: Counter = Counter()

    async def main() -> float:
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(_connection(port, paths, stop_at, latencies, statuses) for _ in range(concurrency)))
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    latencies.sort()
    return {
        "rps": statuses[200] / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "requests": statuses.total(),
        "failed": statuses.total() - statuses[200],
    }


def in_process(threads: int, count: int, seconds: float, streams: int = 1) -> float:
    """Digits/s of ``DigitGenerator.generate(count)`` calls, each with its own seed, from ``streams``
    generators of ``threads`` onnxruntime threads each, called side by side (onnxruntime releases the GIL)."""
    generators = [DigitGenerator.from_path(threads=threads) for _ in range(streams)]
    for generator in generators:
        generator.generate(256)
    started = time.perf_counter()

    def stream(generator: DigitGenerator, first_seed: int) -> int:
        done, seed = 0, first_seed
        while time.perf_counter() - started < seconds:
            generator.generate(count, seed=seed)
            done, seed = done + count, seed + streams
        return done

    with ThreadPoolExecutor(streams) as pool:
        done = sum(pool.map(stream, generators, range(streams)))
    return done / (time.perf_counter() - started)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # VmRSS is in KiB
    raise RuntimeError(f"no VmRSS for {pid}")


def serve_command(*options: str) -> list[str]:
    return [sys.executable, "-m", "digitgen", "serve", "--quiet", "--port", "{port}", *options]


def row(name: str, result: dict) -> str:
    return (
        f"| {name} | {result['rps']:,.0f} | {result['p50_ms']:.1f} | {result['p99_ms']:.1f} | "
        f"{result['failed']} of {result['requests']:,} |"
    )


def throughput_tables(ports: dict[str, int], seconds: float) -> None:
    """``count=1000`` NPZ digits/s of each server beside the in-process rate; one digit per call in-process."""
    npz_path = "/generate?seed={seed}&count=1000&format=npz"
    npz = {name: load(port, npz_path, 2, 2 * seconds) for name, port in ports.items()}
    print("\n| count=1000 NPZ, 2 connections | digits/s | failed |\n|---|---|---|")
    for threads in (1, 2):
        print(f"| anchor: in-process generate(1000), {threads} thread(s) | {in_process(threads, 1000, 5):,.0f} | |")
    two_streams = in_process(1, 1000, 5, streams=2)
    print(f"| anchor: in-process generate(1000), two 1-thread generators side by side | {two_streams:,.0f} | |")
    for name, result in npz.items():
        print(f"| digitgen serve, {name} | {1000 * result['rps']:,.0f} | {result['failed']} |", flush=True)
    print("\n| in-process, one digit per call | digits/s |\n|---|---|")
    print(f"| generate(1), 1 thread | {in_process(1, 1, 3):,.0f} |")
    print(f"| generate(64), 1 thread (what coalescing 64 requests could reach) | {in_process(1, 64, 3):,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    parser.add_argument("--rounds", type=int, default=2, help="one-digit load runs of each server per concurrency")
    parser.add_argument(
        "--batch-window-ms", type=float, nargs="+", default=[0, 2], help="micro-batching windows to compare (0: off)"
    )
    parser.add_argument(
        "--batch-max-digits", type=int, nargs="+", default=[8, 64], help="micro-batch sizes to compare (first: default)"
    )
    parser.add_argument("--batching-only", action="store_true", help="only the one-digit PNG rows of the windows")
    parser.add_argument("--soak", type=int, default=0, help="one-digit requests for the RSS figure (0: skip)")
    args = parser.parse_args()
    png = "/generate?seed={seed}&digit=7"
    print(f"machine: {describe()}; python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d')}")
    print("| server, one-digit PNG | requests/s | p50 ms | p99 ms | failed |\n|---|---|---|---|---|")
    # name -> (command, path that answers 200 once it is ready, request)
    variants = {BARE: ([sys.executable, "-c", BARE_APP, "{port}"], "/constant", "/constant?seed={seed}")}
    for window in args.batch_window_ms:  # the batch size matters only with a window
        for size in args.batch_max_digits if window else args.batch_max_digits[:1]:
            name = f"1 worker, 1 thread, --batch-window-ms {window:g}"
            name += f", --batch-max-digits {size}" if window else ""
            options = ("--threads", "1", "--batch-window-ms", str(window))
            options += ("--batch-max-digits", str(size)) if window else ()
            variants[name] = (serve_command(*options), "/readyz", png)
    if not args.batching_only:
        variants |= {
            "1 worker, 2 threads": (serve_command("--threads", "2"), "/readyz", png),
            "2 workers, 1 thread each": (serve_command("--workers", "2"), "/readyz", png),
            MODEL_FREE: ([sys.executable, "-c", MODEL_FREE_APP, "{port}"], "/readyz", png),
        }
    with ExitStack() as servers:
        ports = {
            name: servers.enter_context(running(command, ready))[0] for name, (command, ready, _) in variants.items()
        }
        for name, port in ports.items():
            load(port, variants[name][2], 16, 1)
        names = list(ports)
        for c in (1, 16, 64):  # every server in turn, the bare one too, each round in a rotated order
            for round_ in range(1, args.rounds + 1):
                results = {
                    name: load(ports[name], variants[name][2], c, args.seconds)
                    for name in names[round_ % len(names) :] + names[: round_ % len(names)]
                }
                for name in names:
                    share = results[name]["rps"] / results[BARE]["rps"]
                    label = f"{name}, concurrency {c}, round {round_} ({share:.0%} of bare in this round)"
                    print(row(label, results[name]), flush=True)
        if not args.batching_only:
            servers_with_model = {name: port for name, port in ports.items() if not name.startswith("anchor")}
            throughput_tables(servers_with_model, args.seconds)
    if args.soak:
        with running(serve_command("--threads", "1"), "/readyz") as (port, process):
            load(port, png, 16, 60, limit=2_000)
            before = rss_mib(process.pid)
            result = load(port, png, 16, 3_600, limit=args.soak)
            after = rss_mib(process.pid)
        print(f"\nsoak: {result['requests']:,} requests, {result['failed']} failed, {result['rps']:,.0f}/s; "
              f"RSS {before:.1f} MiB -> {after:.1f} MiB ({after - before:+.1f} MiB)")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
