"""Per-request bookkeeping as one ASGI middleware: the X-Request-ID, Prometheus metrics and the
access log line."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import quote, unquote

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
    values,
)

from digitgen.runtime.generator import DEFAULT_BATCH_SIZE
from digitgen.runtime.text import cut, printable
from digitgen.serve.settings import ServeConfigError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# a request target in absolute form, as a client talking to a proxy sends it (RFC 9112, 3.2.2): scheme://authority
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/]*")
LOGGED_TARGET = 1024  # characters of a request's path and query in its access-log line
LOGGED_METHOD = 32  # characters of a request's method there (the longest registered method has 17)
LOGGED_CLIENT = 64  # characters of the client's address there (an IPv6 one has at most 45)
ACCESS_LOG = logging.getLogger("digitgen.serve.access")
# the name of the access log's own handler, where nothing above it takes its lines
_OWN_HANDLER = "digitgen-access-stderr"


def route_access_log() -> None:
    """Send the access log's INFO lines through the app's logging where a handler above it takes them (on the root
    logger, as logging.basicConfig puts one, or on ``digitgen``), else to stderr: each line once, either way."""
    ACCESS_LOG.setLevel(logging.INFO)
    for handler in [h for h in ACCESS_LOG.handlers if h.get_name() == _OWN_HANDLER]:  # an earlier app's, made
        ACCESS_LOG.removeHandler(handler)  # before the logging was set up
        ACCESS_LOG.propagate = True
    if not ACCESS_LOG.handlers and not ACCESS_LOG.parent.hasHandlers():
        own = logging.StreamHandler(sys.stderr)
        own.set_name(_OWN_HANDLER)
        ACCESS_LOG.addHandler(own)
        ACCESS_LOG.propagate = False


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
UNPARSED = "unparsed"  # the endpoint label of a request refused before it could be read (400, 408)
BUSY, TIME_LIMIT = "busy", "time_limit"  # why a request was refused with 503, a label of the refused counter
REFUSAL_REASONS = (BUSY, TIME_LIMIT)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def header(scope: Scope, name: bytes) -> str | None:
    """Request header ``name`` (in lower case, as ASGI gives it), several fields of it joined as one list (RFC 9110,
    5.3); ``None`` if absent."""
    return ", ".join(value.decode("latin-1") for key, value in scope.get("headers", ()) if key == name) or None


def local_path(scope: Scope) -> str:
    """The request's path inside this app: the same whether the app is mounted under a prefix or not."""
    return scope["path"].removeprefix(scope.get("root_path", ""))


def origin_form(scope: Scope) -> Scope:
    """``scope`` with a request target in absolute form (``http://host/generate``) read as its path (``/generate``),
    as servers must accept it; uvicorn's pure-Python HTTP parser leaves the whole URL in the path, after the
    ``root_path`` it is given (``--root-path``)."""
    root = scope.get("root_path", "")
    if not scope["path"].startswith(root):  # a scope of another server's making: its path is all the target
        root = ""
    if scope["path"].startswith("/", len(root)):  # the usual form: no look for a scheme
        return scope
    raw_path = scope.get("raw_path")  # optional in ASGI
    if raw_path is None:
        path = _after_authority(scope["path"][len(root) :])
        return scope if path is None else {**scope, "path": root + path, "raw_path": (root + path).encode()}
    # the form is the one sent: a scheme or an authority written with %-escapes is not one (latin-1 keeps each
    # byte as one character), and the path is the rest as sent, decoded as the server decodes a path
    raw_root = root.encode("latin-1")
    raw = _after_authority(raw_path.removeprefix(raw_root).decode("latin-1"))
    if raw is None:
        return scope
    return {**scope, "path": root + unquote(raw), "raw_path": raw_root + raw.encode("latin-1")}


def _after_authority(target: str) -> str | None:
    """``target``'s path after its ``scheme://authority`` (``/`` for none), or ``None`` if it has none."""
    match = _ABSOLUTE_FORM.match(target)
    return None if match is None else target[match.end() :] or "/"


def bounded(text: str, limit: int) -> str:
    """``text`` as a log line or a refusal shows what a client sent: escaped as :func:`printable` does, then cut at
    ``limit`` characters, so that no request writes more than a line of bounded length."""
    return cut(printable(text), limit)


def logged_target(path: str, query: str) -> str:
    """The request's path and query as its access-log line shows them (:func:`bounded`), a quote as ``%22``,
    so that the line's quoted field ends where the server's own quote does."""
    return bounded(f"{path}?{query}" if query else path, LOGGED_TARGET).replace('"', "%22")


def logged_method(scope: Scope) -> str:
    """The request's method as a log line or a refusal shows it: HTTP does not bound it, so it is cut."""
    return bounded(scope["method"], LOGGED_METHOD).replace('"', "%22")


def logged_client(host: str) -> str:
    """The client's address as its access-log line shows it. Behind a proxy the server trusts (uvicorn trusts
    127.0.0.1's ``X-Forwarded-For`` by default) it is whatever that header said, so anything but the characters
    of an address is %-escaped (spaces and quotes too, so that it cannot forge the line's other fields) and it
    is cut."""
    return cut(quote(host, safe=".:[]_-"), LOGGED_CLIENT)


SHARED_METRICS = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode: where its processes count
# The files each process counts in there (prometheus-client names them TYPE_PID.db), and the room reserved for each:
# they are written through mmap, so a page the filesystem cannot supply would kill the process with SIGBUS rather
# than raise; reserved, the few hundred counts of these metrics never need another page
SHARED_FILES = ("counter", "histogram", "gauge_livesum")
SHARED_FILE_BYTES = 256 * 1024
_LIVE_GAUGE = re.compile(r"gauge_live\w*_([0-9]+)\.db")  # a process's share of a gauge summed over live processes


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (one per app), beside what every Python
    service exports: the process's memory, CPU time and open files (Linux), the garbage collector, the
    Python version.

    ``shared`` (the workers of ``serve --workers`` 2 or more): the counts are kept in files of the folder
    :data:`SHARED_METRICS` names, which prometheus-client reads when it is imported, so that a scrape of any
    worker gives the whole server's counts; the per-process collectors are left out, as they would describe only
    the worker that answered."""

    def __init__(self, shared: bool = False) -> None:
        if shared and values.ValueClass is values.MutexValue:
            raise RuntimeError(f"shared metrics need {SHARED_METRICS} set before prometheus_client is imported")
        self.shared = shared
        self.registry = CollectorRegistry()
        if shared:
            folder = os.environ[SHARED_METRICS]
            try:
                reserve(folder, [f"{kind}_{os.getpid()}.db" for kind in SHARED_FILES])
            except OSError as exc:
                raise ServeConfigError(f"cannot keep this worker's metrics in {folder}: {exc.strerror or exc}") from exc
            multiprocess.MultiProcessCollector(self.registry)
        else:
            for collector in (ProcessCollector, GCCollector, PlatformCollector):
                collector(registry=self.registry)
        own = None if self.shared else self.registry  # shared: the counts reach the registry through the files
        self.requests = Counter(
            "digitgen_requests",
            "Requests answered, by endpoint and status (endpoint unparsed: refused before the app could read them)",
            ["endpoint", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "digitgen_request_seconds",
            "Time from request to the end of the response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.digits = Counter("digitgen_digits_generated", "Digits generated", registry=own)
        self.refused = Counter(
            "digitgen_requests_refused", "Requests refused with 503, by reason", ["reason"], registry=own
        )
        for reason in REFUSAL_REASONS:  # at 0 from the start, so that a dashboard's rate() has a series to read
            self.refused.labels(reason)
        self.abandoned = Counter(
            "digitgen_requests_abandoned",
            "Requests whose client left before the whole response (a generation run on a thread stops at its next "
            f"batch of {DEFAULT_BATCH_SIZE} digits), or was cut off for leaving it unread",
            registry=own,
        )
        self.batch_requests = Histogram(
            "digitgen_batch_requests",
            "Requests per micro-batched model call",
            buckets=BATCH_BUCKETS,
            registry=own,
        )
        self.admitted = Gauge(
            "digitgen_requests_admitted", "Requests generating or waiting", registry=own, multiprocess_mode="livesum"
        )

    def latest(self) -> bytes:
        """The metrics in Prometheus's text format; shared, without the gauge shares of processes that have
        stopped without :meth:`close` (killed, or replaced by uvicorn's supervisor)."""
        if self.shared:
            folder = os.environ[SHARED_METRICS]
            for name in os.listdir(folder):
                match = _LIVE_GAUGE.fullmatch(name)
                if match and not _alive(int(match[1])):
                    multiprocess.mark_process_dead(int(match[1]), folder)
        return generate_latest(self.registry)

    def close(self) -> None:
        """The process is stopping: its share of the shared gauges goes (its counts stay in the totals)."""
        if self.shared:
            multiprocess.mark_process_dead(os.getpid())


def reserve(folder: str, names: list[str], size: int = SHARED_FILE_BYTES) -> None:
    """Give each file ``names`` in ``folder`` at least ``size`` bytes of the filesystem's room (new ones zeros, which
    prometheus-client reads as an empty file of that capacity), or raise :class:`OSError` having made none of them."""
    made: list[str] = []
    try:
        for path in (os.path.join(folder, name) for name in names):
            if not os.path.exists(path):  # one of the same name (a process of the same number before) keeps its counts
                made.append(path)
            with open(path, "r+b" if path not in made else "w+b") as f:  # not "a": glibc's fallocate refuses O_APPEND
                try:
                    os.posix_fallocate(f.fileno(), 0, size)
                except (AttributeError, OSError) as exc:  # no fallocate here (NFS, FUSE, macOS): written out
                    if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                        raise
                    end = f.seek(0, os.SEEK_END)
                    f.write(bytes(max(0, size - end)))
                    f.flush()
    except OSError:
        for path in made:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process of that number: alive
        pass
    return True


class _RequestIds:
    """New request ids, unique across processes and time: 32 hex digits, a random half drawn once per process (not
    a system call per request) and a count."""

    def __init__(self) -> None:
        self.draw()

    def draw(self) -> None:
        self._random_half = uuid.uuid4().hex[:16]
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._random_half}{next(self._count):016x}"


new_request_id = _RequestIds()
os.register_at_fork(after_in_child=new_request_id.draw)  # a forked child would otherwise repeat its parent's ids


class RequestMiddleware:
    """Gives every response an ``X-Request-ID`` (the client's when it sends one, a plain token, else a new one:
    32 hex digits, this process's random half and a count; also ``scope["state"]["request_id"]``), counts
    and times it by endpoint, and writes one access-log line when ``access_log`` is set."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: frozenset[str], access_log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope = origin_form(scope)
        given = [value for name, value in scope["headers"] if name == b"x-request-id"]  # ASGI: in lower case
        one = given[0].decode("latin-1") if len(given) == 1 else ""  # two: neither is the request's, a new one is
        request_id = one if REQUEST_ID.fullmatch(one) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id  # for the app's own log lines
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            path = scope["path"]
            local = local_path(scope)
            endpoint = local if local in self.endpoints else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            if self.access_log:
                client = scope.get("client") or ("-", 0)
                ACCESS_LOG.info(
                    '%s:%s "%s %s" %d %.1fms id=%s',
                    logged_client(str(client[0])),
                    client[1],
                    logged_method(scope),
                    logged_target(path, scope["query_string"].decode("latin-1")),
                    status,
                    seconds * 1000,
                    request_id,
                )
