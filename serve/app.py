"""The ASGI app: ``create_app(generator)`` serves digits over HTTP with FastAPI."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import Route

from digitgen.runtime.encode import encoder_versions
from digitgen.runtime.errors import DigitgenError
from digitgen.runtime.generator import DEFAULT_BATCH_SIZE, DigitGenerator
from digitgen.runtime.text import printable
from digitgen.serve.batch import Batcher
from digitgen.serve.limits import AbandonedError, Admission, OverloadedError, TimeLimitError
from digitgen.serve.observe import (
    BUSY,
    TIME_LIMIT,
    ASGIApp,
    Message,
    Metrics,
    Receive,
    RequestMiddleware,
    Scope,
    Send,
    header,
    local_path,
    logged_method,
    logged_target,
    route_access_log,
)
from digitgen.serve.page import PageFiles
from digitgen.serve.params import (
    MEDIA_TYPES,
    DigitsRequest,
    NotAcceptableError,
    etag,
    not_modified,
    precondition_failed,
)
from digitgen.serve.params import parse_request as parse
from digitgen.serve.refusal import refusal
from digitgen.serve.render import encode, filename, generate
from digitgen.serve.settings import ServeConfigError, ServeSettings
from digitgen.serve.spec import error_response, generate_doc


class _Client:
    """A request's client, watched from the moment the request has to wait for a slot or generates on a thread:
    :meth:`gone` (for the queue) and :meth:`abandoned` (for a generation thread) are set once ASGI's ``receive``
    says that the client has left. A request that takes a free slot and generates inline is not watched."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None  # made with the events below, as the first is asked for

    def gone(self) -> asyncio.Event:
        self._watch()
        return self._gone

    def abandoned(self) -> threading.Event:
        self._watch()
        return self._abandoned

    def _watch(self) -> None:
        if self._watcher is None:
            self._gone, self._abandoned = asyncio.Event(), threading.Event()
            self._watcher = asyncio.create_task(self._until_disconnected())

    async def _until_disconnected(self) -> None:
        """Read the request's messages until the disconnect. Once the body has ended a server waits for the
        disconnect before it answers ``receive``; one that answers at once with another message instead would
        have this loop spin forever without yielding, so the client is then left unwatched."""
        ended = False
        while (message := await self._receive())["type"] != "http.disconnect":
            if ended:
                return
            ended = not message.get("more_body", False)
        self._gone.set()
        self._abandoned.set()

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()


class _Service:
    """The state behind the endpoints: the generator, the ETag source, admission and readiness."""

    def __init__(self, generator: DigitGenerator, settings: ServeSettings, metrics: Metrics) -> None:
        self.generator = generator
        self.settings = settings
        self.metrics = metrics
        self.etag_source = f"{generator.sha256}|{encoder_versions(generator.provider)}"
        self.cache_control = f"public, max-age={settings.cache_max_age}, immutable"
        self.warmup_error: str | None = None
        self.ready = False
        self.stopping = False  # set by the server as it begins to stop: what it cancels from then on is its doing
        # the generation threads, and what runs on one event loop: made by start()
        self.executor: ThreadPoolExecutor | None = None
        self.admission: Admission | None = None
        self.batcher: Batcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warming_up: asyncio.Task[None] | None = None
        self._batching: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the warm-up (until one has succeeded) and the batcher on the running loop: from the app's
        lifespan, or from its first request where no lifespan runs (an app mounted in another app). A
        later lifespan, or a request on another loop, starts them again there."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        self._loop = loop
        if self.executor is None:
            self.executor = ThreadPoolExecutor(self.settings.max_in_flight, thread_name_prefix="digitgen-generate")
        self.admission = Admission(self.settings.max_in_flight, self.settings.queue, self.metrics.admitted.set)
        self._warming_up = None if self.ready else loop.create_task(self._warm_up_in_a_slot())
        if self.settings.batch_window_ms > 0:
            self.batcher = Batcher(
                self.generator,
                self.settings.batch_window_ms / 1000,
                self.settings.micro_batch_digits,
                self.executor,
                self.admission.generation,
                self.metrics.batch_requests.observe,
            )
            self._batching = loop.create_task(self.batcher.run())
            self._batching.add_done_callback(self._batcher_ended)

    def _batcher_ended(self, task: asyncio.Task[None]) -> None:
        """Only :meth:`stop` should end the batcher. If a bug ends it, say so in the log, answer the requests it
        held with the error (a 500), and run small requests one by one from then on rather than let them wait
        for a batcher that is gone."""
        if task.cancelled() or task is not self._batching:
            return
        error = task.exception() or RuntimeError("the micro-batcher returned")
        logging.getLogger("digitgen.serve").error(
            "micro-batching stopped (%s: %s); small requests now run one by one", type(error).__name__, error
        )
        if self.batcher is not None:
            self.batcher.fail_waiting(error)
        self.batcher, self._batching = None, None

    async def stop(self) -> None:
        """Stop the batcher, answering the requests it held with a 503 (a server that stops cancels its requests
        first; a host that does not still gets an answer), let the warm-up and generation threads finish;
        :meth:`start` may follow."""
        if self._batching is not None:
            self._batching.cancel()
            if self._batching.get_loop() is asyncio.get_running_loop():
                with suppress(asyncio.CancelledError):
                    await self._batching
        if self.batcher is not None:
            self.batcher.fail_waiting(OverloadedError("the server is stopping; retry later"))
        self.batcher = None
        if self._warming_up is not None:
            await self._warming_up
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        self.executor, self._loop, self._warming_up, self._batching = None, None, None, None

    async def _warm_up_in_a_slot(self) -> None:
        """:meth:`warm_up` on a generation thread, holding a generation slot as a request does: requests that
        arrive meanwhile wait for it rather than run beside it."""
        async with self.admission.generation():
            await asyncio.get_running_loop().run_in_executor(self.executor, self.warm_up)

    def warm_up(self) -> None:
        """One batch through the model, so the first request does not pay onnxruntime's first-run cost; a
        failure is kept for ``/readyz`` and the log."""
        try:
            self.generator.generate(DEFAULT_BATCH_SIZE)
        except Exception as exc:  # onnxruntime's own errors are not DigitgenErrors
            self.warmup_error = str(exc) if isinstance(exc, DigitgenError) else f"{type(exc).__name__}: {exc}"
            logging.getLogger("digitgen.serve").error("warm-up batch failed: %s", self.warmup_error)
            return
        self.warmup_error = None
        self.ready = True

    def unready(self, failure: Exception) -> None:
        """A request failed: ``/readyz`` answers 503, so that a load balancer sends requests elsewhere, and starts a
        warm-up batch; ready again once one runs (at once, when the failure was that request's alone)."""
        self.ready = False
        self.warmup_error = f"a request failed ({type(failure).__name__}: {failure}); a warm-up batch runs again"

    def retry_warm_up(self) -> None:
        """Start another warm-up if the last one failed and none is running: a replica whose model could
        not run at start (a busy GPU, say) becomes ready once it can."""
        running = self._warming_up is not None and not self._warming_up.done()
        if self.warmup_error is not None and not running and self._loop is asyncio.get_running_loop():
            self._warming_up = self._loop.create_task(self._warm_up_in_a_slot())

    def batched(self, request: DigitsRequest) -> bool:
        return self.batcher is not None and request.count <= self.settings.inline_digits

    async def body(self, request: DigitsRequest, deadline: float, client: _Client) -> bytes:
        """The response body; small requests inline or through the batcher, larger ones on a generation
        thread, which stops between batches once the client has gone."""
        if self.batcher is not None and self.batched(request):
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    digits = await self.batcher.digits(request)
            except TimeoutError:
                raise TimeLimitError from None
            return encode(digits, request.fmt)
        if request.count <= self.settings.inline_digits:
            return encode(generate(self.generator, request), request.fmt)
        abandoned = client.abandoned()

        def work() -> bytes:
            return encode(generate(self.generator, request, deadline, abandoned), request.fmt)

        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, work)
        except asyncio.CancelledError:
            abandoned.set()
            raise

    async def respond(self, http: Request) -> Response:
        try:
            request = parse(
                http.query_params.multi_items(), header(http.scope, b"accept"), self.generator, self.settings.max_count
            )
        except NotAcceptableError as exc:
            return refusal(406, str(exc))
        except DigitgenError as exc:
            return refusal(422, str(exc))
        tag = etag(self.etag_source, request)
        headers = {"ETag": tag, "Cache-Control": self.cache_control, "Vary": "Accept"}
        if precondition_failed(header(http.scope, b"if-match"), tag):
            return refusal(412, f"If-Match names no ETag of this answer, which is {tag}")
        if not_modified(header(http.scope, b"if-none-match"), tag):
            return Response(status_code=304, headers=headers)
        deadline = time.monotonic() + self.settings.time_limit
        client = _Client(http.receive)
        try:
            async with self.admission.admit() if self.batched(request) else self.admission.slot(deadline, client.gone):
                body = await self.body(request, deadline, client)
        except OverloadedError as exc:
            self.metrics.refused.labels(BUSY).inc()
            return refusal(503, str(exc), {"Retry-After": "1"})
        except TimeLimitError:
            self.metrics.refused.labels(TIME_LIMIT).inc()
            message = (
                f"the request ran past this server's time limit of {self.settings.time_limit:g} s; "
                "ask for fewer digits, or retry when the server is less busy"
            )
            return refusal(503, message, {"Retry-After": "1"})
        except AbandonedError:
            self.metrics.abandoned.inc()
            return refusal(499, "the client closed the connection before the response was ready")
        except MemoryError as exc:  # the CLI's words, less its advice on formats: a response holds every digit
            return refusal(422, f"not enough memory: {exc}")
        except Exception as exc:  # answered with a 500 by the entry; until a warm-up batch runs again, not ready
            self.unready(exc)
            raise
        finally:
            client.stop_watching()
        self.metrics.digits.inc(request.count)
        name = filename(request.fmt, request.digits[0])
        if name:
            disposition = "inline" if request.fmt in ("png", "grid") else "attachment"
            headers["Content-Disposition"] = f'{disposition}; filename="{name}"'
        return Response(body, media_type=MEDIA_TYPES[request.fmt], headers=headers)


# uvicorn cancels the requests still running when its --graceful-timeout (timeout_graceful_shutdown) ends so
_SERVER_STOPPING = "timeout graceful shutdown exceeded"


def _server_stopping(cancelled: asyncio.CancelledError) -> bool:
    """Whether ``cancelled`` is the server giving up on the request as it stops (uvicorn's words), not a host
    app's own cancellation, which must go on up."""
    return any(_SERVER_STOPPING in str(reason) for reason in cancelled.args)


FRAMED_TWICE = (
    "a request with both Content-Length and Transfer-Encoding has no one length (RFC 9112, 6.3); send one of them "
    "(the server closes this connection)"
)


_FRAMING = (b"content-length", b"transfer-encoding")


def _framed_twice(scope: Scope) -> bool:
    """Whether the request says its body's length two ways: a proxy in front that reads the other one would take
    the rest of the connection for a request of its own (request smuggling), so it is refused and the
    connection closed."""
    lengths = {name for name, _ in scope.get("headers", ()) if name in _FRAMING}  # ASGI's names are in lower case
    return len(lengths) == len(_FRAMING)


def _no_body_for_head(scope: Scope, send: Send) -> Send:
    """``send``, dropping the body of the answer to a ``HEAD`` request, whatever the server does with one."""
    if scope["method"] != "HEAD":
        return send

    async def send_headers_only(message: Message) -> None:
        await send({**message, "body": b""} if message["type"] == "http.response.body" else message)

    return send_headers_only


class _OneLength:
    """Refuses a request framed two ways (:func:`_framed_twice`) ahead of every layer but the request id's, CORS's
    answers to preflight requests among them, and closes its connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _framed_twice(scope):
            refused = refusal(400, FRAMED_TWICE, {"Connection": "close"})
            await refused(scope, receive, _no_body_for_head(scope, send))
            return
        await self.app(scope, receive, send)


class _ServiceEntry:
    """Where requests enter: starts the service on the first one (see :meth:`_Service.start`), and answers
    ``GET /generate`` ahead of FastAPI's router with the documented route's own handler (the router's layers, an exit
    stack and dependency solving among them, cost a third as much as making a one-digit request's digit).
    Everything else goes on to the app. ``HEAD`` to an endpoint is answered as ``GET`` (FastAPI's routes answer
    only the methods they name, and naming HEAD too would give each OpenAPI operation twice), and no HEAD
    response carries a body, whatever the server. An unexpected exception is logged with the request id and
    answered with a 500 in JSON here, inside the CORS and request-id middleware, so that the answer keeps their
    headers."""

    def __init__(self, app: ASGIApp, service: _Service, endpoints: frozenset[str]) -> None:
        self.app = app
        self.service = service
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._until_cut_off(receive), send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        send = _no_body_for_head(scope, send)
        if scope["method"] == "HEAD" and local_path(scope) in self.endpoints:  # the page's files answer HEAD
            scope = {**scope, "method": "GET"}

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        request_id = scope.get("state", {}).get("request_id", "-")
        where = f"{printable(scope['path'])} (id={request_id})"
        log = logging.getLogger("digitgen.serve")
        try:
            self.service.start()
            if scope["method"] == "GET" and local_path(scope) == "/generate":
                response = await self.service.respond(Request(scope, receive))
                await response(scope, receive, send_tracked)
            else:
                await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError as cancelled:
            if not (self.service.stopping or _server_stopping(cancelled)):  # a host's own timeout or cancel scope
                raise
            asyncio.current_task().uncancel()  # answered here: the request's task ends as a request does
            log.warning("%s cut off: the server stopped before it was answered", where)
            if not started:
                stopping = refusal(503, "the server is stopping; retry later", {"Retry-After": "1"})
                await stopping(scope, receive, send_tracked)
        except Exception as exc:  # a bug, or the model failing to run: logged, and a 500 in the service's words
            log.exception("unexpected error in %s", where)
            if started:  # too late for a response of its own: the server closes the connection
                raise
            message = f"internal error ({type(exc).__name__}); the server log has the details (id={request_id})"
            await refusal(500, message)(scope, receive, send_tracked)

    def _until_cut_off(self, receive: Receive) -> Receive:
        """The lifespan's ``receive``, which reads a forced quit (a second Ctrl-C: the server stopping cancels the
        lifespan instead of ending it) as the end of the lifespan, so that the service stops as it would have and
        the log holds no traceback."""

        async def receive_or_shutdown() -> Message:
            try:
                return await receive()
            except asyncio.CancelledError:
                if not self.service.stopping:
                    raise
                asyncio.current_task().uncancel()
                return {"type": "lifespan.shutdown"}

        return receive_or_shutdown


class _Cors(CORSMiddleware):
    """Starlette's CORS middleware, whose refused preflight requests answer in JSON as every refusal here does."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        message = f"{bytes(response.body).decode()}: this server allows cross-origin GET and HEAD only from its origins"
        return refusal(response.status_code, message, headers)


def _lifespan(service: _Service) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        try:
            await service.stop()
        finally:
            service.metrics.close()

    return lifespan


def create_app(
    generator: DigitGenerator, settings: ServeSettings | None = None, *, metrics: Metrics | None = None
) -> FastAPI:
    """An ASGI app that serves ``generator``'s digits: ``/generate``, ``/healthz``, ``/readyz``,
    ``/metrics``, OpenAPI docs at ``/docs``, and the built page at ``/`` when ``settings.web_dir`` is set.

    Run it with any ASGI server, or mount it in another app. The warm-up and the micro-batcher start with
    the app's lifespan, or with its first request where none runs (a mounted app). ``metrics``: the app's own
    unless given (the server's workers give shared ones).
    """
    if not isinstance(generator, DigitGenerator):
        raise ServeConfigError(f"create_app needs a DigitGenerator (DigitGenerator.from_path(...)), got {generator!r}")
    settings = ServeSettings() if settings is None else settings
    if not isinstance(settings, ServeSettings):
        raise ServeConfigError(f"settings must be a ServeSettings, got {settings!r}")
    metrics = Metrics() if metrics is None else metrics
    if not isinstance(metrics, Metrics):
        raise ServeConfigError(f"metrics must be a Metrics, got {metrics!r}")
    service = _Service(generator, settings, metrics)
    app = FastAPI(
        redirect_slashes=False,  # "/generate/" is a 404 in JSON, not a redirect built from the Host header
        title="digitgen",
        summary="Handwritten digits from a GAN trained on MNIST, as PNG, contact sheet, NPZ, IDX or JSON.",
        lifespan=_lifespan(service),
    )
    app.state.metrics = metrics  # for the server's HTTP protocol, which answers what never reaches the app
    app.state.service = service  # and says when the server begins to stop

    # documents the endpoint in OpenAPI; _ServiceEntry answers its requests first, with the same handler
    doc = generate_doc(settings.max_count, generator.num_classes)

    @app.get("/generate", openapi_extra=doc, response_class=Response)
    async def generate_digits(request: Request) -> Response:
        """Generate digits: the same parameters, noise and bytes as `digitgen generate`. HEAD answers the
        same headers without the body."""
        return await service.respond(request)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "alive"}

    @app.get("/readyz", responses={503: error_response("Not ready yet")})
    async def readyz() -> Response:
        """Ready once the model has run one warm-up batch (a failed one is tried again), and again after a request
        failed."""
        if not service.ready:
            service.retry_warm_up()
            why = service.warmup_error or "the model's warm-up batch has not run yet"
            return refusal(503, f"not ready: {why}")
        body = {"status": "ready", "model_sha256": generator.sha256, "provider": generator.provider}
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics of this process (of every worker with ``--workers`` 2 or more)."""
        return Response(metrics.latest(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # as received (the URL's path drops a tab or a newline), escaped and cut as in the access log
        path = logged_target(request.scope["path"], "")
        if exc.status_code == 404:
            return refusal(404, f"no endpoint {path}; see {request.scope.get('root_path', '')}/docs")
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow")
            if allowed and local_path(request.scope) not in endpoints:
                # a route an app added to this one answers the methods Starlette names (FastAPI adds no HEAD)
                answers = f", which answers {allowed}"
            else:  # every endpoint here answers GET, and HEAD through _ServiceEntry; so do the page's files
                allowed, answers = "GET, HEAD", "; this server answers GET and HEAD"
            return refusal(405, f"{logged_method(request.scope)} is not allowed on {path}{answers}", {"Allow": allowed})
        return refusal(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    # the app's own routes, its documentation's among them (not the page's files, mounted below)
    endpoints = frozenset(route.path for route in app.routes if isinstance(route, Route))
    app.add_middleware(_ServiceEntry, service=service, endpoints=endpoints)
    if settings.web_dir is not None:
        app.mount("/", PageFiles(directory=settings.web_dir, html=True), name="web")
    if settings.cors_origins:
        app.add_middleware(
            _Cors,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "HEAD"],
            allow_headers=["Accept", "If-Match", "If-None-Match", "X-Request-ID"],
            expose_headers=["ETag", "X-Request-ID", "Content-Disposition", "Retry-After"],
        )
    if settings.access_log:
        route_access_log()
    app.add_middleware(_OneLength)
    app.add_middleware(RequestMiddleware, metrics=metrics, endpoints=endpoints, access_log=settings.access_log)
    return app
