"""What a server allows and where it runs, checked when they are made: :class:`ServeSettings` (limits, caching,
CORS, the page, logging) and :class:`ServerOptions` (the model, the address, processes, threads).

Free of FastAPI and uvicorn, so that the command line reads its defaults in an install without the serve extra.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from digitgen.runtime.errors import DigitgenError
from digitgen.runtime.generator import DEFAULT_BATCH_SIZE, MAX_INDEX, DigitGenerator

# what `npm run build` puts in web/dist beside the page's code: the page and the model it loads (the web/ folder,
# its source, has no model)
BUILT_PAGE = ("index.html", "generator.onnx")
BATCH_MAX_DIGITS = 8  # the default micro-batch
MAX_COUNT_LIMIT = MAX_INDEX + 1  # the digits of one seed: no request can ask for more
# a URL path of one or more segments (RFC 3986's pchar), no / at its end: what a proxy in front strips
ROOT_PATH = re.compile(r"(/([A-Za-z0-9\-._~!$&()*+,;=:@]|%[0-9A-Fa-f]{2})+)+")  # no ': the docs page quotes it
LISTEN_BACKLOG = 2048  # connections that may wait to be accepted: uvicorn's default
# what a browser sends in Origin: scheme://host[:port], no path, not even a trailing slash, no user, a port
# without leading zeros (or * for any)
ORIGIN = re.compile(
    r"\*|[a-z][a-z0-9+.-]*://(?:[a-z0-9._~%-]+|\[[0-9a-f:.]+\])(?::(?P<port>[1-9][0-9]{0,4}))?", re.IGNORECASE
)


class ServeConfigError(DigitgenError, ValueError):
    """The server cannot start with these settings."""


def _as_browsers_send(origin: str) -> str:
    """An origin as a browser's ``Origin`` header carries it: in lower case, without the scheme's default port."""
    lowered = origin.lower()
    for scheme, default_port in (("http", ":80"), ("https", ":443")):
        if lowered.startswith(f"{scheme}://") and lowered.endswith(default_port):
            return lowered.removesuffix(default_port)
    return lowered


@dataclass(frozen=True)
class ServeSettings:
    """What a server allows: limits, caching, CORS, the page, logging."""

    max_count: int = 10_000  # digits per request
    max_in_flight: int = 2  # generations at once
    queue: int = 64  # requests waiting for a generation slot; more are refused with 503
    time_limit: float = 30.0  # seconds per request, waiting included
    cache_max_age: int = 31_536_000  # seconds a response may be cached (it never changes)
    inline_digits: int = 16  # requests this small run on the event loop (or the batcher), larger ones on a thread
    batch_window_ms: float = 2.0  # micro-batching: how long small requests wait to share a model call (0: off)
    # digits in one micro-batch (None: 8 with a window, see micro_batch_digits): small, so that one batch's HTTP
    # work overlaps the next one's model call
    batch_max_digits: int | None = None
    cors_origins: tuple[str, ...] = ()
    web_dir: str | os.PathLike[str] | None = None  # the built page, served at /; kept as a str
    access_log: bool = True

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("max_count", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ServeConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_count > MAX_COUNT_LIMIT:
            raise ServeConfigError(
                f"max_count must be at most {MAX_COUNT_LIMIT} (the digits of one seed), got {self.max_count}"
            )
        for name in ("queue", "inline_digits", "cache_max_age"):
            if getattr(self, name) < 0:
                raise ServeConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.inline_digits > DEFAULT_BATCH_SIZE:
            raise ServeConfigError(
                f"inline_digits must be at most {DEFAULT_BATCH_SIZE}, got {self.inline_digits}: a request that small "
                "is made in one model call on the event loop, which no time limit stops and no other request passes"
            )
        if not self.time_limit > 0:
            raise ServeConfigError(f"the time limit must be more than 0 s, got {self.time_limit:g}")
        if not (0 <= self.batch_window_ms < math.inf):
            raise ServeConfigError(
                f"the batch window must be 0 ms (off) or a finite number of ms, got {self.batch_window_ms:g}"
            )
        if self.batch_window_ms / 1000 >= self.time_limit:
            raise ServeConfigError(
                f"the batch window of {self.batch_window_ms:g} ms must be shorter than the time limit of "
                f"{self.time_limit:g} s, or every request that waits for a batch runs out of time"
            )
        if self.batch_max_digits is not None:
            if self.batch_window_ms == 0:
                raise ServeConfigError(
                    f"batch_max_digits={self.batch_max_digits} sizes a micro-batch and batch_window_ms=0 turns them "
                    "off: give one"
                )
            if self.batch_max_digits < 1:
                raise ServeConfigError(f"a micro-batch must hold at least 1 digit, got {self.batch_max_digits}")
        self._check_origins()
        if self.web_dir is not None:
            self._check_page()

    def _check_page(self) -> None:
        """The built page's files in ``web_dir``, and no link there that leads out of it (a model linked in beside
        the page, say): its file server follows none, and would answer for it as for no file at all."""
        for name in BUILT_PAGE:
            if not (Path(self.web_dir) / name).is_file():
                raise ServeConfigError(
                    f"{self.web_dir} holds no {name}, so it is not the built page; build it first "
                    "(cd web && npm ci && npm run build) and give web/dist"
                )
        folder = Path(self.web_dir).resolve()
        for root, folders, files in os.walk(self.web_dir):
            folders[:] = [name for name in folders if not name.startswith(".")]  # not served: not looked in
            for name in (*folders, *files):
                path = Path(root) / name
                target = Path(os.path.realpath(path))  # not Path.resolve(), which raises on a loop of links
                if not name.startswith(".") and path.is_symlink() and not target.is_relative_to(folder):
                    raise ServeConfigError(
                        f"{path} links to {target}, outside {self.web_dir}: the server serves no file from outside "
                        "the page's folder; copy it in"
                    )

    def _check_origins(self) -> None:
        """Each CORS origin one that browsers send, given once; ``*`` alone, as it allows any."""
        origins = self.cors_origins
        repeated = next((origin for origin in origins if origins.count(origin) > 1), None)
        if repeated is not None:
            raise ServeConfigError(f"the origin {repeated!r} is given twice")
        if "*" in origins and len(origins) > 1:
            raise ServeConfigError("* allows every origin, so the others given with it would do nothing: give * alone")
        for origin in self.cors_origins:
            if "*" in origin and origin != "*":
                raise ServeConfigError(
                    f"{origin!r} holds a wildcard, which CORS never matches: it compares whole origins; "
                    "give each one (or * alone for any)"
                )
            match = ORIGIN.fullmatch(origin)
            if not match or int(match["port"] or 0) > 65_535:
                raise ServeConfigError(
                    f"{origin!r} is not an origin: scheme://host[:port] with no path, as browsers send it "
                    "(e.g. https://app.example)"
                )
            sent = _as_browsers_send(origin)
            if origin != sent:  # CORS compares the strings: this one would never match
                raise ServeConfigError(f"browsers send the origin {origin!r} as {sent!r}; give that")

    @property
    def micro_batch_digits(self) -> int | None:
        """Digits in one micro-batch: ``batch_max_digits``, or the default where batching is on and none was
        given; ``None`` with batching off."""
        if self.batch_window_ms == 0:
            return None
        return BATCH_MAX_DIGITS if self.batch_max_digits is None else self.batch_max_digits

    def _check_types(self) -> None:
        """Each setting of its own type (a string of origins would be read one letter at a time)."""
        for name in ("max_count", "max_in_flight", "queue", "inline_digits", "cache_max_age"):
            check_type(name, getattr(self, name), (int,), "an integer")
        check_type("batch_max_digits", self.batch_max_digits, (int, type(None)), "an integer or None")
        for name in ("time_limit", "batch_window_ms"):
            check_type(name, getattr(self, name), (int, float), "a number")
        check_type("access_log", self.access_log, (bool,), "True or False")
        _path_as_text(self, "web_dir", "a folder's path (a str or a Path) or None")
        origins = self.cors_origins
        if not isinstance(origins, tuple) or not all(isinstance(origin, str) for origin in origins):
            raise ServeConfigError(
                f"cors_origins must be a tuple of origins, e.g. ('https://app.example',), got {origins!r}"
            )


def check_type(name: str, value: object, kinds: tuple[type, ...], what: str) -> None:
    """:class:`ServeConfigError` unless ``value`` is one of ``kinds`` (a bool counts as an int only if listed)."""
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise ServeConfigError(f"{name} must be {what}, got {value!r}")


def _path_as_text(settings: object, name: str, what: str) -> None:
    """Keep the path ``name`` of frozen ``settings`` as a str (which worker processes receive as JSON), a Path
    given turned into one; :class:`ServeConfigError` for anything else but None."""
    value = getattr(settings, name)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
        object.__setattr__(settings, name, value)
    check_type(name, value, (str, type(None)), what)


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
    root_path: str = ""  # the path prefix a reverse proxy in front strips, e.g. /digits
    settings: ServeSettings = field(default_factory=ServeSettings)

    def __post_init__(self) -> None:
        _path_as_text(self, "model", "a model file's path (a str or a Path) or None")
        for name in ("provider", "host", "root_path"):
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
        if self.root_path and not ROOT_PATH.fullmatch(self.root_path):
            raise ServeConfigError(
                "the root path must be the path prefix a proxy strips, a / then path segments without a / at the "
                f"end, such as /digits; got {self.root_path!r}"
            )

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

    def listen(self) -> tuple[ServerOptions, socket.socket]:
        """A socket bound to ``host:port`` and listening, the one the server will serve on (clients that connect
        meanwhile wait in its queue, none is refused), and these options with port 0 (any free port) replaced by
        the port the system gave; :class:`ServeConfigError` if it could not be bound (in use, not an address of
        this machine, a privileged port). An empty host, which would listen on every interface, is refused: that
        takes 0.0.0.0 (or ::), said on purpose."""
        if not self.host.strip():
            raise ServeConfigError(
                "the host is empty; give an address: 127.0.0.1 (the default), or 0.0.0.0 to listen on every interface"
            )
        if self.host.startswith("["):  # an IPv6 address as a URL writes it, [::1] or [::1]:8000
            address, _, rest = self.host[1:].partition("]")
            port = rest.removeprefix(":")
            fix = f"--host {address} --port {port}" if port.isdigit() else f"--host {address}"
            raise ServeConfigError(f"give the host {self.host!r} as the address alone, without brackets: {fix}")
        host, colon, port = self.host.rpartition(":")
        if colon and ":" not in host and port.isdigit():  # one colon: not an IPv6 address, a host and a port
            raise ServeConfigError(f"the host {self.host!r} holds a port; give them apart: --host {host} --port {port}")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        try:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.bind((self.host, self.port))
            listening.listen(LISTEN_BACKLOG)
        except OSError as exc:
            listening.close()
            reason = exc.strerror or str(exc)
            raise ServeConfigError(
                f"cannot listen on {self.host}:{self.port}: {reason.lower()} (--port and --host choose another)"
            ) from None
        listening.set_inheritable(True)  # shared with the worker processes, as uvicorn shares the one it binds
        return dataclasses.replace(self, port=listening.getsockname()[1]), listening
