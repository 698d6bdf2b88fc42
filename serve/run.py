"""Run the app under uvicorn: one process, or ``workers`` processes that each load the model."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.supervisors import Multiprocess

from digitgen.runtime.errors import InvalidModelError
from digitgen.runtime.generator import DigitGenerator
from digitgen.runtime.session import external_files, model_sha256
from digitgen.runtime.signals import TERMINATING_SIGNALS, handling
from digitgen.serve.app import create_app
from digitgen.serve.observe import (
    ACCESS_LOG,
    SHARED_FILE_BYTES,
    SHARED_FILES,
    SHARED_METRICS,
    UNPARSED,
    Metrics,
    new_request_id,
    reserve,
)
from digitgen.serve.scratch import remove_abandoned, scratch_folder
from digitgen.serve.settings import ServeConfigError, ServerOptions, ServeSettings

WORKER_CONFIG = "DIGITGEN_SERVE_CONFIG"  # how the parent hands the options to worker processes
WORKER_APP = "digitgen.serve.run:app_from_environment"  # what each worker process imports and calls


SUPERVISOR = "DIGITGEN_SERVE_SUPERVISOR"  # the process number of the workers' supervisor, for each worker
ORPHAN_CHECK_S = 1.0  # how often a worker looks whether its supervisor is still there


def app_from_environment() -> FastAPI:
    """The app of one worker process, built from the options its parent put in the environment. A worker ignores
    SIGHUP: a closed terminal sends it to every process of the group, and the supervisor answers it for all
    (replacing the workers one by one, each old one finishing its requests in flight first)."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _stop_when_orphaned(int(os.environ[SUPERVISOR]))
    config = json.loads(os.environ[WORKER_CONFIG])
    settings = config.pop("settings")
    settings["cors_origins"] = tuple(settings["cors_origins"])
    options = ServerOptions(**config, settings=ServeSettings(**settings))
    return create_app(options.load(), options.settings, metrics=Metrics(shared=True))


def _stop_when_orphaned(supervisor: int) -> None:
    """Stop this worker as SIGTERM does (its requests in flight finished) once its supervisor has gone, killed
    before it could stop its workers: left running, they would hold the address, and a new server could not start."""

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(ORPHAN_CHECK_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="digitgen-orphan-watch", daemon=True).start()


# the answer to bytes that are not an HTTP request (the app never sees them): JSON, as every refusal here
NOT_HTTP = json.dumps({"error": "not a valid HTTP/1.1 request; the server closed the connection"}).encode()
HEAD_TIMEOUT = 10.0  # seconds a connection has to send a whole request head after it opens or after its last answer
SEND_TIMEOUT = 30.0  # seconds a client may leave its answer unread (the socket's buffers full) before it is cut off
STOP_GRACE = 2.0  # seconds a connection not being answered has to send its (last) request once the server stops
# uvicorn's warning for bytes that are not a request, which the server answers with a 400 and logs in its access-log
# line (or not, with --quiet): its one line, as for every request
_NOT_HTTP_WARNING = "Invalid HTTP request received."
PROTOCOL_LOG = logging.getLogger("uvicorn.error.protocol")  # uvicorn's protocol messages, through uvicorn's handler
PROTOCOL_LOG.addFilter(lambda record: record.msg != _NOT_HTTP_WARNING)


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

    As the server stops, uvicorn closes at once every connection not being answered, and so drops the request of
    a client that has just connected (to the worker that SIGHUP retires, say), is sending its head, or sends its
    next one on a connection kept alive. Here such a connection has :data:`STOP_GRACE` seconds (no more than the
    graceful timeout) to send it. Every answer from then on, that request's or one being made, is the connection's
    last: it says ``Connection: close`` (unless it had begun) and the connection is closed after it.
    """

    head_timeout = HEAD_TIMEOUT
    send_timeout = SEND_TIMEOUT
    stop_grace = STOP_GRACE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = PROTOCOL_LOG

    def connection_made(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._head_begun = False
        self._stopping = False  # the server is stopping: the connection's next answer is its last
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        self._head_begun = True
        super().data_received(data)
        self._last_answer_if_stopping()

    def on_response_complete(self) -> None:
        self._head_begun = False
        self._await_head()
        super().on_response_complete()
        if self._unread_bytes() and (self.cycle is None or self.cycle.response_complete):
            # part of a pipelined head came with the answered request: its deadline, not uvicorn's keep-alive
            # timer (which would close the connection unanswered), is the one that runs
            self._head_begun = True
            self._unset_keepalive_if_required()

    def _last_answer_if_stopping(self) -> None:
        """Once the server is stopping, make the request being answered the connection's last: its answer, unless
        begun, says ``Connection: close`` (once, whether or not it says so itself), and the connection is closed
        after it. uvicorn does both for a cycle not kept alive with httptools; with h11, for a request that asks
        to close, which this one is then made to ask."""
        cycle = self.cycle
        if not self._stopping or not self._answering() or not cycle.keep_alive:
            return
        cycle.keep_alive = False
        if not cycle.response_started and CLOSE_HEADER not in cycle.scope["headers"]:
            cycle.scope["headers"].append(CLOSE_HEADER)

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
        state = _app_state(self.app)
        if state is not None:  # its access-log line, written once the app had handed the answer over, stays
            state.metrics.abandoned.inc()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset, not a close: the system drops the unsent answer too, at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._cancel_send_deadline()
        super().connection_lost(exc)

    def _await_head(self, seconds: float | None = None) -> None:
        """Arm the head's deadline: ``seconds`` from now (default :attr:`head_timeout`)."""
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(
            self.head_timeout if seconds is None else seconds, self._head_overdue
        )

    def _head_overdue(self) -> None:
        """Close the connection unless a request is being answered (its own time limit is the app's)."""
        self._head_deadline = None
        if self._answering() or self.transport.is_closing():
            return
        if self._head_begun and not self._body_arriving():
            within = f"{self._grace():g} s of the server stopping" if self._stopping else f"{self.head_timeout:g} s"
            too_slow = f"no whole request head within {within}; the server closed the connection"
            self._answer_and_close(408, "Request Timeout", json.dumps({"error": too_slow}).encode())
        else:
            self.transport.close()

    def _answering(self) -> bool:
        """Whether a request on this connection is being answered (its answer not yet complete)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _body_arriving(self) -> bool:
        """Whether the bytes received belong to the body of a request already answered, not to a new head."""
        conn = getattr(self, "conn", None)
        if isinstance(conn, h11.Connection):
            return conn.their_state is h11.SEND_BODY
        return self.cycle is not None and self.cycle.more_body  # httptools

    def _grace(self) -> float:
        """Seconds a connection has to send its request once the server is stopping: :attr:`stop_grace`, or the
        graceful timeout if shorter (uvicorn gives up on the connections then)."""
        limit = self.config.timeout_graceful_shutdown
        return self.stop_grace if limit is None else min(self.stop_grace, limit)

    def shutdown(self) -> None:
        """The server begins to stop (uvicorn tells every connection): what it cancels in the app from now on, a
        forced quit's cut-off among it, is answered as the server stopping, not as a host's cancellation."""
        state = _app_state(self.app)
        if state is not None:
            state.service.stopping = True
        self._stopping = True
        if self._answering():
            self._last_answer_if_stopping()  # answered, then closed
        else:  # uvicorn would close it now, unanswered, with a client's request perhaps on its way
            self._await_head(self._grace())

    def send_400_response(self, msg: str) -> None:
        """Answer :data:`NOT_HTTP`, or 431 for a head past h11's bound, and close (``msg`` is uvicorn's warning, which
        :data:`PROTOCOL_LOG` drops: the access-log line says it)."""
        bound = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        if self._unread_bytes() > bound:  # h11 stopped reading a head that had grown past it
            too_large = f"request head larger than {bound:,} bytes; the server closed the connection"
            self._answer_and_close(431, "Request Header Fields Too Large", json.dumps({"error": too_large}).encode())
        else:
            self._answer_and_close(400, "Bad Request", NOT_HTTP)

    def _unread_bytes(self) -> int:
        """Bytes received and not yet read as a request: h11's buffer (httptools, installed, keeps none to see)."""
        conn = getattr(self, "conn", None)
        return len(conn.trailing_data[0]) if isinstance(conn, h11.Connection) else 0

    def _answer_and_close(self, status: int, reason: str, body: bytes) -> None:
        """Answer a request the app never saw (it could not be read), with a new request id (none can be read
        from it either), the access-log line the app would have written and its count in the app's metrics
        (endpoint ``unparsed``), then close."""
        request_id = new_request_id()
        ACCESS_LOG.info('%s:%s "-" %d id=%s', *(self.client or ("-", 0)), status, request_id)
        state = _app_state(self.app)
        if state is not None:
            state.metrics.requests.labels(UNPARSED, str(status)).inc()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncache-control: no-store\r\n"
            f"content-length: {len(body)}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def _app_state(app: object) -> Any:
    """The state (its metrics and service) of the app :func:`create_app` made, under the middleware uvicorn wraps
    it in; ``None`` for another app."""
    while app is not None:
        state = getattr(app, "state", None)
        if isinstance(getattr(state, "metrics", None), Metrics):
            return state
        app = getattr(app, "app", None)
    return None


@contextmanager
def _exit_zero_on_signals() -> Iterator[None]:
    """uvicorn stops on SIGINT/SIGTERM, then raises the signal again for the handler it found; this
    handler ignores that, so a graceful stop ends the process with status 0. SIGHUP (a closed terminal)
    stops a server as SIGTERM does (one the server was started ignoring, under ``nohup``, stays ignored); with several
    workers uvicorn's supervisor takes it over, to restart them."""
    hangup = [sig for sig in TERMINATING_SIGNALS if sig != signal.SIGTERM]
    with (
        handling((signal.SIGINT, signal.SIGTERM), lambda signum, frame: None),
        handling(hangup, lambda signum, frame: signal.raise_signal(signal.SIGTERM)),
    ):
        yield


def _copied(generator: DigitGenerator, folder: Path) -> Path:
    """The copy, in the new folder ``folder``, of the model ``generator`` was loaded from, checked to be that
    model."""
    changed = ServeConfigError(f"{generator.path} changed while the server started; start it again")
    copy = folder / generator.path.name
    try:
        model = generator.path.read_bytes()
        sources = external_files(model, generator.path)
    except (OSError, ValueError, InvalidModelError):
        raise changed from None
    try:
        folder.mkdir()
        copy.write_bytes(model)
        for source in sources:
            target = folder / source.relative_to(generator.path.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename) in sources:  # gone, or no longer readable
            raise changed from None
        raise _cannot_copy(generator, folder, exc) from exc
    try:
        same = model_sha256(model, copy) == generator.sha256
    except (OSError, ValueError, InvalidModelError):
        same = False
    if not same:
        raise changed
    return copy


def _cannot_copy(generator: DigitGenerator, folder: Path, exc: OSError) -> ServeConfigError:
    return ServeConfigError(
        f"cannot copy {generator.path} for the workers into {folder} ({exc.strerror or exc}); "
        "set TMPDIR to a writable folder with room for it"
    )


def serve(
    options: ServerOptions, generator: DigitGenerator | None = None, listening: socket.socket | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, then finish requests in flight within ``graceful_timeout`` seconds.

    ``generator`` (default: ``options.load()``) serves in this process with one worker; with more, each worker
    process loads a copy of the model file it was loaded from, made once. ``listening``: the socket to serve on,
    from ``options.listen()`` (default: one it makes now, :class:`ServeConfigError` if the address is not free);
    closed when the server stops.
    """
    if listening is None:
        options, listening = options.listen()
    with listening:
        _serve_on(listening, options, generator)


def _serve_on(listening: socket.socket, options: ServerOptions, generator: DigitGenerator | None) -> None:
    log_level = "info" if options.settings.access_log else "warning"
    common = {
        "host": options.host,
        "port": options.port,
        "log_level": log_level,
        "access_log": False,
        "timeout_graceful_shutdown": options.graceful_timeout,
        "root_path": options.root_path,
        "http": ServerHTTP,
        "ws": "none",  # no WebSocket endpoint: an Upgrade request is answered as the HTTP request it also is
    }
    generator = generator or options.load()  # Ctrl-C still interrupts the load
    remove_abandoned()  # what servers with workers killed before they could stop left in the temporary folder
    if options.workers == 1:
        app = create_app(generator, options.settings)
        with _exit_zero_on_signals():
            uvicorn.Server(uvicorn.Config(app, **common)).run(sockets=[listening])
        return
    # the workers load a private copy of the model, when they start and when SIGHUP replaces them: every worker
    # serves the same model, whatever happens to the file meanwhile
    with ExitStack() as stack:
        try:
            folder = stack.enter_context(scratch_folder())
        except OSError as exc:
            raise _cannot_copy(generator, Path(tempfile.gettempdir()), exc) from exc
        copy = _copied(generator, folder / "model")
        _run_workers(dataclasses.replace(options, model=str(copy)), common, listening, folder / "metrics")


def _run_workers(options: ServerOptions, common: dict, listening: socket.socket, shared_metrics: Path) -> None:
    """uvicorn's supervisor and ``options.workers`` processes, each building its app from ``options`` and counting
    its metrics in files of the folder ``shared_metrics`` (made here), so that each answers ``/metrics`` for all."""
    if hasattr(signal, "SIGHUP"):  # started ignoring it, as the workers do: a closed terminal's SIGHUP cannot kill it
        with handling([signal.SIGHUP], signal.SIG_IGN):
            resource_tracker.ensure_running()
    _check_room_for_metrics(shared_metrics, options.workers)
    worker_environment = {
        WORKER_CONFIG: json.dumps(dataclasses.asdict(options)),
        SHARED_METRICS: str(shared_metrics),
        SUPERVISOR: str(os.getpid()),
    }
    config = uvicorn.Config(WORKER_APP, factory=True, workers=options.workers, **common)
    with _environment(worker_environment), _exit_zero_on_signals():
        Multiprocess(config, sockets=[listening]).run()  # uvicorn.run with workers, on this socket


def _check_room_for_metrics(folder: Path, workers: int) -> None:
    """Make the folder ``folder``; :class:`ServeConfigError` unless it has room for the metrics files of ``workers``
    processes (each reserves its own as it starts: see :func:`~digitgen.serve.observe.reserve`)."""
    needed = workers * len(SHARED_FILES) * SHARED_FILE_BYTES
    try:
        folder.mkdir()
        reserve(str(folder), [".room"], needed)
    except OSError as exc:
        raise ServeConfigError(
            f"cannot keep the workers' metrics in {folder} ({exc.strerror or exc}; they take "
            f"{needed / 2**20:g} MiB); set TMPDIR to a writable folder with room for them"
        ) from exc
    (folder / ".room").unlink()


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
