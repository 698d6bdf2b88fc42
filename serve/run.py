"""Run the app under uvicorn: one process, or ``workers`` processes that each load the model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import struct
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from digitgen.runtime.errors import InvalidModelError
from digitgen.runtime.generator import DigitGenerator
from digitgen.runtime.session import external_files, model_sha256
from digitgen.runtime.signals import TERMINATING_SIGNALS, handling
from digitgen.serve.app import ServeConfigError, ServeSettings, check_type, create_app
from digitgen.serve.observe import ACCESS_LOG, SHARED_METRICS, UNPARSED, Metrics

WORKER_CONFIG = "DIGITGEN_SERVE_CONFIG"  # how the parent hands the options to worker processes


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads(workers: int) -> int:
    """onnxruntime intra-op threads per worker: its share of the usable cores less one for its event loop
    (HTTP, noise, encoding), at least one."""
    return max(1, usable_cores() // workers - 1)


@dataclass(frozen=True)
class ServerOptions:
    """Where and how to serve: the model, the address, processes, threads and the app's settings."""

    model: str | None = None
    provider: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int | None = None  # default: default_threads(workers)
    graceful_timeout: float = 10.0
    settings: ServeSettings = field(default_factory=ServeSettings)

    def __post_init__(self) -> None:
        check_type("model", self.model, (str, type(None)), "a model file's path (a str) or None")
        for name in ("provider", "host"):
            check_type(name, getattr(self, name), (str,), "a str")
        for name in ("port", "workers"):
            check_type(name, getattr(self, name), (int,), "an integer")
        check_type("threads", self.threads, (int, type(None)), "an integer or None")
        check_type("graceful_timeout", self.graceful_timeout, (int, float), "a number")
        check_type("settings", self.settings, (ServeSettings,), "a ServeSettings")
        if not 0 <= self.port <= 65_535:
            raise ServeConfigError(f"port must be from 0 (any free port) to 65535, got {self.port}")
        cores = usable_cores()
        if not 1 <= self.workers <= cores:  # each worker is a process running the model: more only compete for cores
            raise ServeConfigError(
                f"workers must be from 1 to {cores}, the cores this process may run on (each worker is a process "
                f"with its own copy of the model), got {self.workers}"
            )
        if self.threads is not None and not 1 <= self.threads <= cores:  # more only take turns on the cores
            raise ServeConfigError(
                f"threads must be from 1 to {cores}, the cores this process may run on, got {self.threads}"
            )
        if not 0 <= self.graceful_timeout < math.inf:
            raise ServeConfigError(f"the graceful timeout must be a finite 0 s or more, got {self.graceful_timeout:g}")

    @property
    def url(self) -> str:
        """Where clients reach the server: ``http://host:port``, an IPv6 host in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def intra_op_threads(self) -> int:
        return self.threads if self.threads is not None else default_threads(self.workers)

    def load(self) -> DigitGenerator:
        """The model, opened and made to draw one digit of each class: one that cannot is refused now, with the
        runtime's error, rather than served by a server that never becomes ready."""
        generator = DigitGenerator.from_path(self.model, self.provider, self.intra_op_threads)
        generator.generate(generator.num_classes)
        return generator

    def check_address(self) -> ServerOptions:
        """These options, port 0 (any free port) replaced by the free port the system gives, once ``host:port``
        has been bound and let go, the way uvicorn binds it after; :class:`ServeConfigError` if it could not be
        (in use, not an address of this machine, a privileged port). An empty host, which would listen on every
        interface, is refused: that takes 0.0.0.0 (or ::), said on purpose."""
        if not self.host.strip():
            raise ServeConfigError(
                "the host is empty; give an address: 127.0.0.1 (the default), or 0.0.0.0 to listen on every interface"
            )
        host, colon, port = self.host.rpartition(":")
        if colon and ":" not in host and port.isdigit():  # one colon: not an IPv6 address, a host and a port
            raise ServeConfigError(f"the host {self.host!r} holds a port; give them apart: --host {host} --port {port}")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((self.host, self.port))
                port = probe.getsockname()[1]
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ServeConfigError(
                f"cannot listen on {self.host}:{self.port}: {reason.lower()} (--port and --host choose another)"
            ) from None
        return dataclasses.replace(self, port=port)


def app_from_environment() -> FastAPI:
    """The app of one worker process, built from the options its parent put in the environment. A worker ignores
    SIGHUP: a closed terminal sends it to every process of the group, and the supervisor answers it for all
    (replacing the workers one by one, each old one finishing its requests in flight first)."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = json.loads(os.environ[WORKER_CONFIG])
    settings = config.pop("settings")
    settings["cors_origins"] = tuple(settings["cors_origins"])
    options = ServerOptions(**config, settings=ServeSettings(**settings))
    return create_app(options.load(), options.settings, metrics=Metrics(shared=True))


# the answer to bytes that are not an HTTP request (the app never sees them): JSON, as every refusal here
NOT_HTTP = json.dumps({"error": "not a valid HTTP/1.1 request; the server closed the connection"}).encode()
HEAD_TIMEOUT = 10.0  # seconds a connection has to send a whole request head after it opens or after its last answer
SEND_TIMEOUT = 30.0  # seconds a client may leave its answer unread (the socket's buffers full) before it is cut off


class ServerHTTP(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol with Nagle's algorithm off on every TCP connection, its 400 for a request it
    cannot parse in JSON rather than plain text, and a deadline for each request's head.

    asyncio sets ``TCP_NODELAY`` only on sockets that report ``IPPROTO_TCP``; the listener uvicorn
    shares between several workers reports 0, and every keep-alive request after the first then
    waits about 40 ms for the client's delayed ACK.

    uvicorn closes a connection left idle after an answer, but not one that never finishes a request head (a
    slow or stalled client, or one holding connections open on purpose): each would keep a socket and a file
    descriptor for good. Here a connection with no whole head :data:`HEAD_TIMEOUT` seconds after it opened or
    after its last answer is closed, with a 408 in JSON if it had sent part of one. Nor does uvicorn bound a
    client that stops reading its answer: the answer would wait in memory for good. Here one whose buffers stay
    full for :data:`SEND_TIMEOUT` seconds is cut off, and counted among the abandoned requests.
    """

    head_timeout = HEAD_TIMEOUT
    send_timeout = SEND_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._head_begun = False
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        self._head_begun = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._head_begun = False
        self._await_head()
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.send_timeout, self._send_overdue)

    def resume_writing(self) -> None:
        self._cancel_send_deadline()
        super().resume_writing()

    def _cancel_send_deadline(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _send_overdue(self) -> None:
        """Cut off a client that has left its answer unread (its buffers full) for :attr:`send_timeout` seconds."""
        self._send_deadline = None
        logging.getLogger("digitgen.serve").warning(
            "%s:%s left its answer unread for %g s; the server cut the connection",
            *(self.client or ("-", 0)),
            self.send_timeout,
        )
        metrics = _metrics_of(self.app)
        if metrics is not None:  # its access-log line, written once the app had handed the answer over, stays
            metrics.abandoned.inc()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset, not a close: the system drops the unsent answer too, at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._cancel_send_deadline()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_overdue)

    def _head_overdue(self) -> None:
        """Close the connection unless a request is being answered (its own time limit is the app's)."""
        self._head_deadline = None
        answering = self.cycle is not None and not self.cycle.response_complete
        if answering or self.transport.is_closing():
            return
        if self._head_begun:
            too_slow = f"no whole request head within {self.head_timeout:g} s; the server closed the connection"
            self._answer_and_close(408, "Request Timeout", json.dumps({"error": too_slow}).encode())
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """Answer :data:`NOT_HTTP` and close (uvicorn has logged ``msg``)."""
        self._answer_and_close(400, "Bad Request", NOT_HTTP)

    def _answer_and_close(self, status: int, reason: str, body: bytes) -> None:
        """Answer a request the app never saw (it could not be read), with a new request id (none can be read
        from it either), the access-log line the app would have written and its count in the app's metrics
        (endpoint ``unparsed``), then close."""
        request_id = uuid.uuid4().hex
        ACCESS_LOG.info('%s:%s "-" %d id=%s', *(self.client or ("-", 0)), status, request_id)
        metrics = _metrics_of(self.app)
        if metrics is not None:
            metrics.requests.labels(UNPARSED, str(status)).inc()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
            f"content-length: {len(body)}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def _metrics_of(app: object) -> Metrics | None:
    """The metrics of the app :func:`create_app` made, under the middleware uvicorn wraps it in; ``None`` for
    another app."""
    while app is not None:
        metrics = getattr(getattr(app, "state", None), "metrics", None)
        if isinstance(metrics, Metrics):
            return metrics
        app = getattr(app, "app", None)
    return None


@contextmanager
def _exit_zero_on_signals() -> Iterator[None]:
    """uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler it found; this
    handler ignores that, so a graceful stop ends the process with status 0. SIGHUP (a closed terminal)
    stops a server as SIGTERM does; with several workers uvicorn's supervisor takes it over, to restart them."""
    hangup = [sig for sig in TERMINATING_SIGNALS if sig != signal.SIGTERM]
    with (
        handling((signal.SIGINT, signal.SIGTERM), lambda signum, frame: None),
        handling(hangup, lambda signum, frame: signal.raise_signal(signal.SIGTERM)),
    ):
        yield


@contextmanager
def _model_copy(generator: DigitGenerator) -> Iterator[Path]:
    """A private copy of the model ``generator`` was loaded from (and of its external data files), for worker
    processes to load, when they start and when SIGHUP replaces them: every worker serves the same model, whatever
    happens to the file meanwhile. :class:`ServeConfigError` if the file no longer holds that model."""
    with tempfile.TemporaryDirectory(prefix="digitgen-serve-") as folder:
        copy = Path(folder) / generator.path.name
        try:
            model = generator.path.read_bytes()
            copy.write_bytes(model)
            for file in external_files(model, generator.path):
                location = file.relative_to(generator.path.parent)
                (copy.parent / location).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, copy.parent / location)
            same = model_sha256(model, copy) == generator.sha256
        except (OSError, ValueError, InvalidModelError):
            same = False
        if not same:
            raise ServeConfigError(f"{generator.path} changed while the server started; start it again")
        yield copy


def serve(options: ServerOptions, generator: DigitGenerator | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then finish requests in flight within ``graceful_timeout`` seconds.

    ``generator`` (default: ``options.load()``) serves in this process with one worker; with more, each worker
    process loads a copy of the model file it was loaded from, made once. :class:`ServeConfigError` if the address
    is not free.
    """
    options = options.check_address()
    log_level = "info" if options.settings.access_log else "warning"
    common = {
        "host": options.host,
        "port": options.port,
        "log_level": log_level,
        "access_log": False,
        "timeout_graceful_shutdown": options.graceful_timeout,
        "http": ServerHTTP,
    }
    generator = generator or options.load()  # Ctrl-C still interrupts the load
    if options.workers == 1:
        app = create_app(generator, options.settings)
        with _exit_zero_on_signals():
            uvicorn.Server(uvicorn.Config(app, **common)).run()
        return
    with _model_copy(generator) as copy:
        _run_workers(dataclasses.replace(options, model=str(copy)), common)


def _run_workers(options: ServerOptions, common: dict) -> None:
    """uvicorn's supervisor and ``options.workers`` processes, each building its app from ``options`` and counting
    its metrics in files of a folder they share (removed at the end), so that each answers ``/metrics`` for all."""
    if hasattr(signal, "SIGHUP"):  # started ignoring it, as the workers do: a closed terminal's SIGHUP cannot kill it
        with handling([signal.SIGHUP], signal.SIG_IGN):
            resource_tracker.ensure_running()
    with tempfile.TemporaryDirectory(prefix="digitgen-metrics-") as shared_metrics:
        worker_environment = {WORKER_CONFIG: json.dumps(dataclasses.asdict(options)), SHARED_METRICS: shared_metrics}
        with _environment(worker_environment), _exit_zero_on_signals():
            uvicorn.run("digitgen.serve.run:app_from_environment", factory=True, workers=options.workers, **common)


@contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` in the environment, for the processes started meanwhile; then the environment as it was (an
    app that calls serve() keeps its own)."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
